"""Failure injection, and steering the simulator per request (headers, prompt directives)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from h2.errors import ErrorCodes

from gateway.sim import SimServer, answer_tokens
from tests.integration.h2_test_client import PROTOCOLS, H2TestClient, send_over

CHAT = "/v1/chat/completions"


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _stream_tokens(body: bytes) -> list[str]:
    """The content deltas of an OpenAI stream body."""
    tokens = []
    for frame in body.split(b"\n\n"):
        data = frame.removeprefix(b"data: ")
        if data.startswith(b"{"):
            delta = json.loads(data)["choices"][0]["delta"] if b'"choices":[{' in data else {}
            if delta.get("content"):
                tokens.append(delta["content"])
    return tokens


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("status", "retry_after"), [(429, "3"), (503, "3"), (500, None)])
async def test_fail_status(sim: SimServer, protocol: str, status: int, retry_after: str | None) -> None:
    headers = {"x-sim-fail-status": str(status), "x-sim-retry-after": "3"}
    openai = await send_over(protocol, sim.port, "POST", CHAT, headers=headers,
                             payload={"messages": _messages("hi"), "stream": True})
    assert openai.status == status
    assert openai.headers.get("retry-after") == retry_after
    assert set(openai.json()["error"]) == {"message", "type", "code"}
    anthropic = await send_over(protocol, sim.port, "POST", "/v1/messages", headers=headers,
                                payload={"messages": _messages("hi"), "max_tokens": 5})
    assert anthropic.status == status
    body = anthropic.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    if status == 429:
        assert body["error"]["type"] == "rate_limit_error"
    assert [(r.outcome, r.status) for r in sim.log.records] == [("failed", status)] * 2


async def test_reset_after_on_h2_is_a_stream_reset(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    messages = _messages("reset me")
    healthy = client.start_json(CHAT, {"messages": messages, "stream": True})
    doomed = client.start_json(CHAT, {"messages": messages, "stream": True},
                               headers={"x-sim-reset-after": "3"})
    await asyncio.wait_for(doomed.done.wait(), 5)
    assert doomed.reset_code == ErrorCodes.INTERNAL_ERROR
    assert _stream_tokens(bytes(doomed.body)) == answer_tokens(messages, 3)
    await asyncio.wait_for(healthy.done.wait(), 5)  # the connection lives on
    assert healthy.ended and healthy.reset_code is None
    await client.close()
    records = {r.id: r for r in sim.log.records}
    assert (records[2].outcome, records[2].tokens_sent) == ("failed", 3)
    assert records[1].outcome == "complete"


async def test_reset_after_on_http1_aborts_the_connection(sim: SimServer) -> None:
    request = {"messages": _messages("hi"), "stream": True}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(sim.url + "/chat/completions", json=request,
                                    headers={"x-sim-reset-after": "2"}) as response:
                assert response.status == 200
                await response.read()
    [record] = sim.log.records
    assert (record.outcome, record.tokens_sent) == ("failed", 2)


async def test_kill_after_takes_every_stream_of_the_connection(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    bystander = client.start_json(CHAT, {"messages": _messages("long"), "stream": True},
                                  headers={"x-sim-tokens": "100000"})
    await asyncio.wait_for(bystander.data_arrived.wait(), 5)
    killer = client.start_json(CHAT, {"messages": _messages("kill"), "stream": True},
                               headers={"x-sim-kill-after": "2"})
    await asyncio.wait_for(client.closed.wait(), 5)
    assert not killer.ended and not bystander.ended
    assert killer.reset_code is None and bystander.reset_code is None
    by_id = {r.id: r for r in await sim.log.wait_for(2)}
    assert (by_id[2].outcome, by_id[2].tokens_sent) == ("failed", 2)
    assert by_id[1].outcome == "disconnect"
    await client.close()


async def test_goaway_graceful_serves_up_to_its_stream_then_closes(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    first = client.start_json(CHAT, {"messages": _messages("one"), "stream": True},
                              headers={"x-sim-itl-ms": "3"})
    await asyncio.wait_for(first.data_arrived.wait(), 5)
    second = client.start_json(CHAT, {"messages": _messages("two"), "stream": True},
                               headers={"x-sim-goaway": "graceful"})
    await asyncio.wait_for(client.goaway_received.wait(), 5)
    assert client.goaway is not None
    assert client.goaway.last_stream_id == second.stream_id == 3
    assert client.goaway.error_code == ErrorCodes.NO_ERROR
    await asyncio.wait_for(client.closed.wait(), 5)
    assert first.ended and second.ended
    assert _stream_tokens(bytes(second.body)) == answer_tokens(_messages("two"), 64)
    assert [r.outcome for r in sim.log.records] == ["complete", "complete"]
    await client.close()


async def test_goaway_refuse_never_answers_the_stream(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    first = client.start_json(CHAT, {"messages": _messages("one"), "stream": True})
    await asyncio.wait_for(first.data_arrived.wait(), 5)
    refused = client.start_json(CHAT, {"messages": _messages("two [sim goaway=refuse]"),
                                       "stream": True})
    await asyncio.wait_for(client.goaway_received.wait(), 5)
    assert client.goaway is not None
    # RFC 9113 §6.8: stream 3 is above last_stream_id, so never processed.
    assert client.goaway.last_stream_id == first.stream_id == 1
    await asyncio.wait_for(client.closed.wait(), 5)
    assert first.ended
    assert refused.status is None and not refused.body and refused.reset_code is None
    assert [r.outcome for r in sim.log.records] == ["complete", "failed"]
    await client.close()


async def test_goaway_over_http1(sim: SimServer) -> None:
    request = {"messages": _messages("hi"), "max_tokens": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.url + "/messages", json=request,
                                headers={"x-sim-goaway": "graceful"}) as response:
            assert response.headers["Connection"] == "close"
            assert (await response.json())["usage"]["output_tokens"] == 2
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(sim.url + "/messages", json=request,
                                    headers={"x-sim-goaway": "refuse"}):
                pass
    assert [r.outcome for r in sim.log.records] == ["complete", "failed"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_malformed_after(sim: SimServer, protocol: str) -> None:
    messages = _messages("garble [sim malformed_after=4]")
    openai = await send_over(protocol, sim.port, "POST", CHAT,
                             payload={"messages": messages, "stream": True})
    assert openai.body.endswith(b'data: {"malformed\n\n')
    assert b"[DONE]" not in openai.body
    assert _stream_tokens(openai.body) == answer_tokens(messages, 4)
    anthropic = await send_over(protocol, sim.port, "POST", "/v1/messages",
                                payload={"messages": messages, "stream": True, "max_tokens": 99})
    assert anthropic.body.endswith(b'event: content_block_delta\ndata: {"malformed\n\n')
    whole = await send_over(protocol, sim.port, "POST", CHAT, payload={"messages": messages})
    assert (whole.status, whole.body) == (200, b'{"malformed')
    assert [r.outcome for r in sim.log.records] == ["failed"] * 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_directive_beats_header_beats_process(sim: SimServer, protocol: str) -> None:
    messages = _messages("count [sim tokens=3 token_size=5]")
    reply = await send_over(protocol, sim.port, "POST", CHAT, headers={"x-sim-tokens": "9"},
                            payload={"messages": messages})
    assert reply.json()["choices"][0]["message"]["content"] == "".join(
        answer_tokens(messages, 3, token_size=5)
    )
    by_header = await send_over(protocol, sim.port, "POST", CHAT, headers={"x-sim-tokens": "9"},
                                payload={"messages": _messages("count")})
    assert by_header.json()["usage"]["completion_tokens"] == 9
    by_process = await send_over(protocol, sim.port, "POST", CHAT,
                                 payload={"messages": _messages("count")})
    assert by_process.json()["usage"]["completion_tokens"] == 64


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_bad_knobs_are_400(sim: SimServer, protocol: str) -> None:
    bad_directive = await send_over(protocol, sim.port, "POST", CHAT,
                                    payload={"messages": _messages("[sim tokenz=3]")})
    assert bad_directive.status == 400
    assert "tokenz" in bad_directive.json()["error"]["message"]
    bad_header = await send_over(protocol, sim.port, "POST", "/v1/messages",
                                 headers={"x-sim-ttft-ms": "soon"},
                                 payload={"messages": _messages("hi"), "max_tokens": 1})
    assert bad_header.status == 400
    assert bad_header.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("directive", "message"), [
    ("tokens=1000001", "tokens must be <= 1000000"),
    ("tokens=1025 token_size=16384", "tokens * token_size must be <= 16777216 characters"),
])
async def test_an_answer_too_long_to_build_is_400(
    sim: SimServer, protocol: str, directive: str, message: str
) -> None:
    # max_tokens=1 keeps the request cheap: the bound is on the knobs themselves.
    reply = await send_over(protocol, sim.port, "POST", CHAT,
                            payload={"messages": _messages(f"[sim {directive}]"), "max_tokens": 1})
    assert reply.status == 400
    assert reply.json() == {"error": {"message": message, "type": "invalid_request_error",
                                      "code": "invalid_request"}}
    assert [(r.outcome, r.status) for r in sim.log.records] == [("failed", 400)]


async def test_ttft_header_delays_the_first_token(sim: SimServer) -> None:
    await send_over("HTTP/2", sim.port, "POST", CHAT, headers={"x-sim-ttft-ms": "150"},
                    payload={"messages": _messages("slow"), "stream": True, "max_tokens": 2})
    [record] = sim.log.records
    assert record.first_token is not None
    assert record.first_token - record.arrival >= 0.15


async def test_h2_body_over_the_limit_is_answered_before_it_ends(sim: SimServer) -> None:
    """RFC 9113 §8.1: a complete 413, then RST_STREAM(NO_ERROR) to stop the upload."""
    sim.app.max_request_body = 1000
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    exchange = client.start("POST", CHAT, body=b"x" * 2000, end_stream=False)
    await asyncio.wait_for(exchange.reset_received.wait(), 5)
    assert exchange.status == 413 and exchange.json()["error"]["code"] == "payload_too_large"
    assert exchange.reset_code == ErrorCodes.NO_ERROR
    healthy = await client.post_json(CHAT, {"messages": _messages("hi"), "max_tokens": 1})
    assert healthy.status == 200  # the connection carries on
    await client.close()
