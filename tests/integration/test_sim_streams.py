"""What the simulator says, byte for byte, over HTTP/1.1 and HTTP/2 on one port."""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.sim import SimProfile, SimServer, answer_tokens
from tests.conftest import SimFactory
from tests.integration.h2_test_client import PROTOCOLS, H2TestClient, send_over

MESSAGES = [{"role": "user", "content": "Tell me about lighthouses."}]
PROMPT_TOKENS = 4  # words

pytestmark = pytest.mark.parametrize("protocol", PROTOCOLS)


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _sse_data(body: bytes) -> list[bytes]:
    frames = body.split(b"\n\n")
    assert frames[-1] == b"", "the stream must end with a blank line"
    assert all(frame.startswith(b"data: ") for frame in frames[:-1])
    return [frame.removeprefix(b"data: ") for frame in frames[:-1]]


async def test_openai_stream_exact_bytes(sim: SimServer, protocol: str) -> None:
    request = {
        "model": "m-1",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply = await send_over(protocol, sim.port, "POST", "/v1/chat/completions", payload=request)
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    first = json.loads(_sse_data(reply.body)[0])
    envelope = {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": "m-1",
    }

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**envelope, "choices": [choice]}

    tokens = answer_tokens(MESSAGES, 64)
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 64, "total_tokens": 68}
    expected = [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": token}) for token in tokens),
        chunk({}, "stop"),
        {**envelope, "choices": [], "usage": usage},
    ]
    assert reply.body == b"".join(b"data: " + _compact(c) + b"\n\n" for c in expected) + (
        b"data: [DONE]\n\n"
    )
    assert "".join(tokens).encode() != "".join(tokens).encode("ascii", "replace")  # multi-byte
    [record] = sim.log.records
    assert (record.format, record.http_version, record.stream) == ("openai", protocol, True)
    assert (record.outcome, record.tokens_sent, record.status) == ("complete", 64, 200)


async def test_anthropic_stream_exact_bytes(sim: SimServer, protocol: str) -> None:
    request = {"model": "claude-x", "max_tokens": 1000, "messages": MESSAGES, "stream": True}
    reply = await send_over(protocol, sim.port, "POST", "/v1/messages", payload=request)
    assert reply.status == 200
    message_id = json.loads(reply.body.split(b"\n")[1].removeprefix(b"data: "))["message"]["id"]
    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 0},
    }
    tokens = answer_tokens(MESSAGES, 64)
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        *(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            )
            for t in tokens
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 64},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    expected = b"".join(
        b"event: " + name.encode() + b"\ndata: " + _compact(data) + b"\n\n" for name, data in events
    )
    assert reply.body == expected


async def test_non_stream_answers(sim: SimServer, protocol: str) -> None:
    openai = await send_over(
        protocol, sim.port, "POST", "/v1/chat/completions", payload={"messages": MESSAGES}
    )
    assert openai.status == 200 and openai.headers["content-type"] == "application/json"
    body = openai.json()
    text = "".join(answer_tokens(MESSAGES, 64))
    assert body["object"] == "chat.completion" and body["model"] == "sim-1"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 64, "total_tokens": 68}

    anthropic = await send_over(
        protocol, sim.port, "POST", "/v1/messages", payload={"messages": MESSAGES, "max_tokens": 64}
    )
    message = anthropic.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": text}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": PROMPT_TOKENS, "output_tokens": 64}
    assert [r.stream for r in sim.log.records] == [False, False]
    assert all(r.outcome == "complete" and r.first_token is not None for r in sim.log.records)


async def test_max_tokens_caps_the_answer(sim: SimServer, protocol: str) -> None:
    capped = {"messages": MESSAGES, "max_completion_tokens": 5, "max_tokens": 50}
    openai = await send_over(protocol, sim.port, "POST", "/v1/chat/completions", payload=capped)
    choice = openai.json()["choices"][0]
    assert choice["message"]["content"] == "".join(answer_tokens(MESSAGES, 5))
    assert choice["finish_reason"] == "length"

    request = {"messages": MESSAGES, "max_tokens": 7, "stream": True}
    anthropic = await send_over(protocol, sim.port, "POST", "/v1/messages", payload=request)
    assert anthropic.body.count(b"event: content_block_delta") == 7
    assert b'"stop_reason":"max_tokens"' in anthropic.body
    assert b'"usage":{"output_tokens":7}' in anthropic.body


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/v1/chat/completions",
            b"{not json",
            {"error": {"type": "invalid_request_error", "code": "invalid_request"}},
        ),
        (
            "/v1/messages",
            b'{"messages": [{"role": "user", "content": "hi"}]}',
            {"type": "error", "error": {"type": "invalid_request_error"}},
        ),
        (
            "/v1/chat/completions",
            b'{"messages": "hi"}',
            {"error": {"type": "invalid_request_error", "code": "invalid_request"}},
        ),
    ],
)
async def test_bad_requests_get_400_in_the_providers_shape(
    sim: SimServer, protocol: str, path: str, body: bytes, expected: dict[str, Any]
) -> None:
    if protocol == "HTTP/2":
        client = await H2TestClient.connect("127.0.0.1", sim.port)
        exchange = await client.request("POST", path, body=body)
        await client.close()
        status, payload = exchange.status, exchange.json()
    else:
        async with aiohttp.ClientSession() as session, session.post(sim.origin + path, data=body) as r:
            status, payload = r.status, await r.json()
    assert status == 400
    error = payload["error"]
    assert isinstance(error.pop("message"), str)
    assert {**payload, "error": error} == expected
    assert sim.log.records[0].outcome == "failed" and sim.log.records[0].status == 400


async def test_other_routes(sim: SimServer, protocol: str) -> None:
    models = await send_over(protocol, sim.port, "GET", "/v1/models")
    assert models.json()["data"][0]["id"] == "sim-1"
    health = await send_over(protocol, sim.port, "GET", "/healthz")
    assert health.json() == {"status": "ok"}
    missing = await send_over(protocol, sim.port, "GET", "/v2/nothing")
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await send_over(protocol, sim.port, "GET", "/v1/chat/completions")
    assert wrong.status == 405
    assert sim.log.records == []  # only model requests are logged


async def test_authorization_presence_is_logged_never_its_value(sim: SimServer, protocol: str) -> None:
    request = {"messages": MESSAGES, "max_tokens": 1}
    await send_over(protocol, sim.port, "POST", "/v1/messages", payload=request,
                    headers={"x-api-key": "secret-key"})
    await send_over(protocol, sim.port, "POST", "/v1/messages", payload=request)
    assert [r.authorization for r in sim.log.records] == [True, False]
    assert "secret-key" not in json.dumps([r.to_json() for r in sim.log.records])


async def test_big_response_follows_flow_control(sim_factory: SimFactory, protocol: str) -> None:
    """1 MiB through the default 64 KiB windows: the sim waits for WINDOW_UPDATEs."""
    sim = await sim_factory(SimProfile(ttft_ms=0, ttft_jitter_ms=0, itl_ms=0, itl_jitter_ms=0))
    request = {"messages": MESSAGES, "max_tokens": 64, "stream": True}
    reply = await send_over(protocol, sim.port, "POST", "/v1/chat/completions", payload=request,
                            headers={"x-sim-token-size": "16384"})
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "")
                   for d in _sse_data(reply.body)[:-1])
    assert text == "".join(answer_tokens(MESSAGES, 64, token_size=16384))
    assert len(text) == 1 << 20


async def test_tls_with_alpn(sim_factory: SimFactory, protocol: str) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    sim = await sim_factory(ssl=server_context)
    assert sim.url == f"https://127.0.0.1:{sim.port}/v1"
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    request = {"messages": MESSAGES, "max_tokens": 3}
    if protocol == "HTTP/2":
        client_context.set_alpn_protocols(["h2"])
        client = await H2TestClient.connect("127.0.0.1", sim.port, ssl=client_context)
        assert client.transport is not None
        assert client.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        exchange = await client.request(
            "POST", "/v1/messages", body=json.dumps(request).encode()
        )
        await client.close()
        text = exchange.json()["content"][0]["text"]
    else:
        async with aiohttp.ClientSession() as session, session.post(
            sim.url + "/messages", json=request, ssl=client_context
        ) as response:
            text = (await response.json())["content"][0]["text"]
    assert text == "".join(answer_tokens(MESSAGES, 3))
    assert sim.log.records[0].http_version == protocol


async def test_body_over_the_limit_is_413(sim: SimServer, protocol: str) -> None:
    sim.app.max_request_body = 1000
    request = {"messages": [{"role": "user", "content": "x" * 2000}]}
    reply = await send_over(protocol, sim.port, "POST", "/v1/chat/completions", payload=request)
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert sim.log.records == []
