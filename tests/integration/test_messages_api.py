"""POST /v1/messages, Anthropic's Messages API, over real sockets: the
official ``anthropic`` SDK and raw HTTP, exact event sequences, Anthropic-
shaped errors, and one upstream call for a burst through both APIs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.sim.content import answer_tokens
from tests.integration.conftest import FAST_SIM
from tests.integration.quiet_h2_peer import gateway_settings, quiet_h2_peer
from tests.integration.sse_frames import FrameReader, openai_text
from tests.loopback import event_stream_upstream, serving


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


def message(prompt: str, **extra: object) -> dict[str, object]:
    return {"model": "sim", "max_tokens": 100, "messages": [{"role": "user", "content": prompt}],
            **extra}


@pytest.fixture
async def client(gateway):
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="k", max_retries=0)
    yield sdk
    await sdk.close()


@pytest.mark.parametrize("upstream_format", ["openai", "anthropic"])
async def test_anthropic_sdk_creates_and_streams(gateway_factory, upstream_format):
    gateway = await gateway_factory(upstream_format=upstream_format)
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="k", max_retries=0)
    try:
        prompt = f"messages via {upstream_format} [sim resolved_model=sim-2025 cached_tokens=1]"
        whole = await sdk.messages.create(**message(prompt))
        async with sdk.messages.stream(**message(prompt + "!")) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    finally:
        await sdk.close()
    assert [(b.type, b.text) for b in whole.content] == [("text", expected(prompt))]
    assert (whole.model, whole.stop_reason, whole.role) == ("sim-2025", "end_turn", "assistant")
    assert whole.usage.output_tokens == FAST_SIM.tokens
    assert whole.usage.cache_read_input_tokens == 1
    assert text == expected(prompt + "!")
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.model == "sim-2025"
    assert final.usage.output_tokens == FAST_SIM.tokens
    paths = {r.path for r in gateway.sim.log.records}
    assert paths == {"/v1/messages" if upstream_format == "anthropic" else "/v1/chat/completions"}


async def test_stream_events_in_anthropic_order(gateway):
    async with aiohttp.ClientSession() as http, http.post(
        gateway.v1 + "/messages", json=message("event order", stream=True)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = await FrameReader(resp).rest()
    assert frames[0].raw == b": ping\n\n"
    assert frames[1].comment.startswith("meta ")
    events = [f.event for f in frames if f.event]
    assert events == (
        ["message_start", "content_block_start"]
        + ["content_block_delta"] * FAST_SIM.tokens
        + ["content_block_stop", "message_delta", "message_stop"]
    )
    by_event = [(f.event, f.json()) for f in frames if f.event]
    for name, data in by_event:
        assert data["type"] == name
    start = by_event[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "sim"
    assert start["id"].startswith("msg_")
    assert by_event[1][1] == {"type": "content_block_start", "index": 0,
                              "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in by_event if n == "content_block_delta")
    assert text == expected("event order")
    assert by_event[-3][1] == {"type": "content_block_stop", "index": 0}
    delta = by_event[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == FAST_SIM.tokens
    assert frames[-1].raw == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


async def test_an_openai_refusal_says_refusal_in_its_stop_reason(gateway):
    """OpenAI streams a refusal in delta.refusal and ends it with "stop"; an
    Anthropic client reads the words as text and the stop reason "refusal"."""
    prompt = "refuse [sim refusal=1]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/messages", json=message(prompt, stream=True)) as resp:
            frames = await FrameReader(resp).rest()
    events = [(f.event, f.json()) for f in frames if f.event]
    assert [name for name, _ in events] == (
        ["message_start", "content_block_start"]
        + ["content_block_delta"] * FAST_SIM.tokens
        + ["content_block_stop", "message_delta", "message_stop"]
    )
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == expected(prompt)
    assert events[-2][1]["delta"] == {"stop_reason": "refusal", "stop_sequence": None}


async def test_an_openai_refusal_says_refusal_in_the_whole_message(client):
    prompt = "refuse, whole [sim refusal=1]"
    whole = await client.messages.create(**message(prompt))
    assert [(b.type, b.text) for b in whole.content] == [("text", expected(prompt))]
    assert (whole.stop_reason, whole.stop_sequence) == ("refusal", None)


async def test_a_burst_through_both_apis_is_one_upstream_call(gateway):
    prompt = "both apis [sim ttft_ms=150]"
    chat = {"model": "sim", "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession() as http:

        async def via_chat(stream: bool) -> str:
            async with http.post(gateway.v1 + "/chat/completions",
                                 json={**chat, "stream": stream}) as r:
                if stream:
                    return openai_text(await FrameReader(r).rest())
                return (await r.json())["choices"][0]["message"]["content"]

        async def via_messages(stream: bool) -> str:
            async with http.post(gateway.v1 + "/messages",
                                 json=message(prompt, stream=stream)) as r:
                if stream:
                    frames = await FrameReader(r).rest()
                    return "".join(f.json()["delta"]["text"] for f in frames
                                   if f.event == "content_block_delta")
                return (await r.json())["content"][0]["text"]

        burst = [
            call(stream) for _ in range(5) for call in (via_chat, via_messages)
            for stream in (True, False)
        ]
        texts = await asyncio.gather(*burst)
    assert texts == [expected(prompt)] * len(burst)
    assert len(gateway.sim.log.records) == 1
    stats = gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (1, len(burst) - 1)


async def test_errors_before_the_200_are_anthropic_shaped(gateway, client):
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.v1 + "/messages",
                                 json={"model": "sim", "messages": []}) as resp:
                body = await resp.json()
        assert resp.status == 400
        assert body == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "'max_tokens' must be a positive integer"}}
        assert [entry["status"] for entry in logs if entry["event"] == "request"] == [400]
        async with http.post(gateway.v1 + "/messages", data=b"{not json",
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.get(gateway.v1 + "/messages") as resp:
            assert resp.status == 405
            assert (await resp.json())["type"] == "error"
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        await client.messages.create(
            **message("x"), thinking={"type": "enabled", "budget_tokens": 1024}
        )
    with pytest.raises(anthropic.RateLimitError) as caught:
        # Retry-After: 0, so that the next request is not held off.
        await client.messages.create(**message("limited [sim fail_status=429 retry_after_s=0]"))
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    # Still serving.
    answer = await client.messages.create(**message("after errors"))
    assert answer.content[0].text == expected("after errors")


async def test_a_path_under_the_messages_route_answers_anthropic_errors(gateway, client):
    """The SDK's other Messages calls (``count_tokens``, batches) are not
    served: their 404 has Anthropic's shape, as every error of this API."""
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.count_tokens(
            model="sim", messages=[{"role": "user", "content": "count"}])
    assert caught.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "no such path"}}
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.v1 + "/messages/batches") as resp:
            status, body = resp.status, await resp.json()
    assert status == 404
    assert body == {"type": "error", "error": {"type": "not_found_error", "message": "no such path"}}
    assert gateway.sim.log.records == []


THINKING_OFF = [{"thinking": {"type": "disabled"}}, {"thinking": None}, {"service_tier": None},
                {"stream": None}]


@pytest.mark.parametrize("upstream_format", ["openai", "anthropic"])
@pytest.mark.parametrize("field", THINKING_OFF, ids=["thinking disabled", "thinking null",
                                                     "unknown field null", "stream null"])
async def test_a_field_that_asks_for_the_default_is_answered(gateway_factory, upstream_format,
                                                             field):
    """Thinking disabled is Anthropic's default, and a null field is one left
    out: the answer honours both as it is, so neither is refused."""
    gateway = await gateway_factory(upstream_format=upstream_format)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/messages", json=message("default", **field)) as resp:
            status, answer = resp.status, await resp.json()
    assert status == 200
    assert answer["content"] == [{"type": "text", "text": expected("default")}]
    assert len(gateway.sim.log.records) == 1


MESSAGES_ENCODING = [
    ("lone surrogate", b'{"model": "sim", "max_tokens": 8, "messages": '
                       b'[{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("NaN", b'{"model": "sim", "max_tokens": 8, "temperature": NaN, "messages": '
            b'[{"role": "user", "content": "hi"}]}', "NaN"),
    ("invalid UTF-8", b'{"model": "sim\xff", "max_tokens": 8, "messages": []}', "UTF-8"),
    ("an integer too long", b'{"model": "sim", "max_tokens": ' + b"7" * 5000 + b', "messages": '
                            b'[{"role": "user", "content": "hi"}]}', "integer too long"),
]


@pytest.mark.parametrize(("case", "raw", "named"), MESSAGES_ENCODING,
                         ids=[c[0] for c in MESSAGES_ENCODING])
async def test_a_body_json_cannot_carry_is_a_400(gateway, case, raw, named):
    # Read as strictly as a chat completion's body: a lone surrogate would
    # fail the prompt key's UTF-8 encoding (a 500 before), and NaN is not JSON.
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.v1 + "/messages", data=raw,
                                 headers={"Content-Type": "application/json"}) as resp:
                body = await resp.json()
        assert resp.status == 400
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert named in body["error"]["message"]
        assert [entry["status"] for entry in logs if entry["event"] == "request"] == [400]
        assert not [entry for entry in logs if entry.get("log_level") in ("error", "critical")]
    assert gateway.sim.log.records == []


EMPTY_CONTENT = [
    # Anthropic answers 400 for a turn with no content (only a final
    # assistant turn, a prefill, may be empty).
    ("openai", [], "'messages[0].content' must not be empty (only a final assistant turn may be)"),
    ("openai", "", "'messages[0].content' must not be empty (only a final assistant turn may be)"),
    # An empty text block: an Anthropic upstream would see no turn at all,
    # an OpenAI one an empty question.
    ("openai", [{"type": "text", "text": ""}], "'messages[0].content[0].text' must not be empty"),
    ("anthropic", [{"type": "text", "text": ""}],
     "'messages[0].content[0].text' must not be empty"),
]


@pytest.mark.parametrize(("upstream_format", "content", "message"), EMPTY_CONTENT,
                         ids=["empty list", "empty string", "empty block", "empty block, anthropic"])
async def test_empty_content_is_a_400_before_the_upstream(
    gateway_factory, upstream_format, content, message
):
    """Streaming, the client gets the 400, not a 200 with the upstream's
    refusal as an error event."""
    gateway = await gateway_factory(upstream_format=upstream_format)
    body = {"model": "sim", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": content}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/messages", json=body) as resp:
            status, answer = resp.status, await resp.read()
    assert status == 400
    assert json.loads(answer) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": message}}
    assert gateway.sim.log.records == []


async def test_an_empty_final_assistant_turn_is_no_turn(tool_peer):
    """An empty prefill says nothing, as an Anthropic upstream reads it: the
    OpenAI upstream gets no empty assistant message either."""
    url, asked = tool_peer
    body = {"model": "sim", "max_tokens": 8, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
    (chat,) = asked
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]


SAMPLING_OUT_OF_RANGE = [
    ({"temperature": 1.5}, "'temperature' must be a number from 0 to 1"),
    ({"temperature": -0.1}, "'temperature' must be a number from 0 to 1"),
    ({"top_p": 1.01}, "'top_p' must be a number from 0 to 1"),
    ({"top_k": -1}, "'top_k' must be a non-negative integer"),
    ({"top_k": 2.5}, "'top_k' must be a non-negative integer"),
]


@pytest.mark.parametrize(("field", "words"), SAMPLING_OUT_OF_RANGE,
                         ids=[str(c[0]) for c in SAMPLING_OUT_OF_RANGE])
async def test_sampling_out_of_anthropic_ranges_is_a_400(gateway_factory, field, words):
    """Anthropic's ranges (API reference, "Messages"): temperature and top_p
    0 to 1, top_k an integer from 0. Through either upstream format the
    client gets Anthropic's 400 before any upstream call."""
    for upstream_format in ("openai", "anthropic"):
        gateway = await gateway_factory(upstream_format=upstream_format)
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway.v1 + "/messages",
                                 json=message("sampled", stream=True, **field)) as resp:
                status, answer = resp.status, await resp.read()
        assert status == 400
        assert json.loads(answer) == {"type": "error", "error": {
            "type": "invalid_request_error", "message": words}}
        assert gateway.sim.log.records == []


async def test_sampling_at_the_ends_of_anthropic_ranges_is_answered(gateway):
    body = message("ends", temperature=1, top_p=0, top_k=0)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/messages", json=body) as resp:
            assert resp.status == 200
            answer = await resp.json()
    assert answer["content"] == [{"type": "text", "text": expected("ends")}]


async def test_an_empty_system_list_is_no_system_message(tool_peer):
    """``system: []`` says nothing: no system message with an empty content
    list, which OpenAI refuses ("empty array"), goes upstream."""
    url, asked = tool_peer
    body = {"model": "sim", "max_tokens": 8, "system": [],
            "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
    (chat,) = asked
    assert chat["messages"] == [{"role": "user", "content": "Hi"}]


async def test_an_upstream_failure_mid_stream_is_an_error_event(gateway, client):
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(**message("cut [sim reset_after=2]")) as stream:
            async for _ in stream:
                pass
    assert caught.value.body["type"] == "error"
    async with aiohttp.ClientSession() as http, http.post(
        gateway.v1 + "/messages", json=message("cut again [sim reset_after=2]", stream=True)
    ) as resp:
        frames = await FrameReader(resp).rest()
    events = [f.event for f in frames if f.event]
    assert events[-1] == "error" and "message_stop" not in events
    error = frames[-1].json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"


async def test_keys_require_the_anthropic_header_or_bearer(gateway_factory):
    gateway = await gateway_factory(gateway_api_keys=("good",))
    bad = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="bad", max_retries=0)
    good = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="good", max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await bad.messages.create(**message("auth"))
        assert caught.value.body["error"]["type"] == "authentication_error"
        assert (await good.messages.create(**message("auth"))).content[0].text == expected("auth")
    finally:
        await bad.close()
        await good.close()


async def test_cache_control_and_system_reach_an_anthropic_upstream(gateway_factory):
    """The same request through both APIs: one key, so one upstream call."""
    gateway = await gateway_factory(upstream_format="anthropic")
    system = [{"type": "text", "text": "A long manual.", "cache_control": {"type": "ephemeral"}}]
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="k", max_retries=0)
    oai = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    prompt = "cached question [sim ttft_ms=150]"
    try:
        native, chat = await asyncio.gather(
            sdk.messages.create(**message(prompt), system=system),
            oai.chat.completions.create(
                model="sim", max_tokens=100,
                messages=[{"role": "system", "content": system},
                          {"role": "user", "content": prompt}],
            ),
        )
    finally:
        await sdk.close()
        await oai.close()
    assert native.content[0].text == chat.choices[0].message.content
    (record,) = gateway.sim.log.records
    assert record.path == "/v1/messages"


# -- thinking and tool calls, from a real OpenAI-style peer ----------------------------

_CHUNK = '{"id":"c","object":"chat.completion.chunk","created":1,"model":"real-1",'
TOOL_ANSWER = "".join(
    f"data: {_CHUNK}{rest}}}\n\n" for rest in (
        '"choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"Think"}}]',
        '"choices":[{"index":0,"delta":{"reasoning_content":"ing."}}]',
        '"choices":[{"index":0,"delta":{"content":"Calling."}}]',
        '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_A","type":"function",'
        '"function":{"name":"get_weather","arguments":""}}]}}]',
        '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        '{"arguments":"{\\"city\\":"}}]}}]',
        '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        '{"arguments":"\\"Paris\\"}"}}]}}]',
        '"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_B","type":"function",'
        '"function":{"name":"get_time","arguments":"{}"}}]}}]',
        '"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]',
        '"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":20}',
    )
) + "data: [DONE]\n\n"  # fmt: skip


@pytest.fixture
async def tool_peer():
    """A real OpenAI-style server (HTTP/1.1) that answers every request with
    reasoning, text and two tool calls; counts what it was asked."""
    asked: list[dict] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        asked.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(TOOL_ANSWER.encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serving(app) as upstream:
        settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                            upstream_url=upstream + "/v1")
        async with running_gateway(settings) as (_, url):
            yield url, asked


async def test_thinking_and_tool_calls_become_content_blocks(tool_peer):
    url, asked = tool_peer
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=message("tools", stream=True)) as resp:
            frames = await FrameReader(resp).rest()
        async with http.post(url + "/v1/messages", json=message("tools")) as resp:
            whole = await resp.json()
    events = [(f.event, f.json()) for f in frames if f.event]
    assert [
        (name, data.get("index"), data.get("content_block") or data.get("delta"))
        for name, data in events[1:-2]
    ] == [
        ("content_block_start", 0, {"type": "thinking", "thinking": "", "signature": ""}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "Think"}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "ing."}),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, {"type": "text", "text": ""}),
        ("content_block_delta", 1, {"type": "text_delta", "text": "Calling."}),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, {"type": "tool_use", "id": "call_A", "name": "get_weather",
                                    "input": {}}),
        ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": '{"city":'}),
        ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": '"Paris"}'}),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, {"type": "tool_use", "id": "call_B", "name": "get_time",
                                    "input": {}}),
        ("content_block_delta", 3, {"type": "input_json_delta", "partial_json": "{}"}),
        ("content_block_stop", 3, None),
    ]  # fmt: skip
    assert events[0][1]["message"]["model"] == "real-1"
    assert events[-2][1] == {
        "type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 9, "output_tokens": 20},
    }  # fmt: skip
    assert whole["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Calling."},
        {"type": "tool_use", "id": "call_A", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_B", "name": "get_time", "input": {}},
    ]
    assert (whole["model"], whole["stop_reason"]) == ("real-1", "tool_use")
    assert whole["usage"] == {"input_tokens": 9, "output_tokens": 20}
    # What the peer was asked: the Messages request read as a chat request.
    assert asked[0]["messages"] == [{"role": "user", "content": "tools"}]
    assert asked[0]["max_tokens"] == 100 and asked[0]["stream"] is True


async def test_a_tool_conversation_is_translated_for_the_upstream(tool_peer):
    url, asked = tool_peer
    body = {
        "model": "sim", "max_tokens": 50,
        "system": "Be brief.",
        "tools": [{"name": "get_weather", "description": "Weather", "strict": True,
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_A", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_A", "content": "Sunny"},
                {"type": "text", "text": "And so?"}]},
        ],
    }  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
    (chat,) = asked
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_A", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_A", "content": "Sunny"},
        {"role": "user", "content": "And so?"},
    ]  # fmt: skip
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True}}]
    assert (chat["tool_choice"], chat["parallel_tool_calls"]) == ("required", False)
    assert (chat["stop"], chat["user"]) == (["END"], "u1")


@pytest.mark.parametrize("field", [{"input_examples": [{"city": "Paris"}]},
                                   {"allowed_callers": ["direct"]}, {"defer_loading": True}])
async def test_a_tool_field_without_a_translation_is_a_400(tool_peer, field):
    """A tool's field the OpenAI request cannot carry would be lost on the
    way (examples the model never sees): refused by name, as a top-level
    field is, and nothing goes upstream."""
    url, asked = tool_peer
    tool = {"name": "get_weather", "input_schema": {"type": "object"}, **field}
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=message("tools", tools=[tool])) as resp:
            status, answer = resp.status, await resp.json()
    assert status == 400
    (name,) = field
    assert answer == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": f"'tools[0].{name}' is not supported by this gateway's Messages API"}}
    assert asked == []


@pytest.mark.parametrize("tools", [None, []], ids=["no tools", "empty tools"])
@pytest.mark.parametrize("choice", [{"type": "auto"}, {"type": "any"},
                                    {"type": "tool", "name": "get_weather"}],
                         ids=["auto", "any", "tool"])
async def test_a_tool_choice_without_tools_is_a_400_before_the_upstream(tool_peer, tools, choice):
    """Anthropic's API and an OpenAI upstream both refuse a tool_choice with
    no tool to choose: streaming, the upstream's refusal would come after the
    200, so the client gets Anthropic's 400 and nothing goes upstream."""
    url, asked = tool_peer
    body = message("no tools", stream=True, tool_choice=choice)
    if tools is not None:
        body["tools"] = tools
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=body) as resp:
            status, answer = resp.status, await resp.read()
    assert status == 400
    assert json.loads(answer) == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "'tool_choice' may only be given with tools"}}
    assert asked == []


async def test_a_tool_choice_of_none_without_tools_is_the_default(tool_peer):
    """``none`` is what no tools means: answered, and the upstream is not
    sent a tool_choice it would refuse for want of tools."""
    url, asked = tool_peer
    body = message("no tools", tool_choice={"type": "none"})
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
    (chat,) = asked
    assert "tool_choice" not in chat and "tools" not in chat


async def test_an_empty_tools_list_is_no_tools(tool_peer):
    """Anthropic takes ``tools: []`` as no tools; an OpenAI upstream refuses
    an empty tools array, so the request it gets has none."""
    url, asked = tool_peer
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/messages", json=message("tools", tools=[])) as resp:
            assert resp.status == 200
    (chat,) = asked
    assert "tools" not in chat


async def test_an_answer_with_thinking_goes_back_in_the_tool_loop(tool_peer):
    """Anthropic's tool loop: the answer's content (its thinking included) is
    sent back as the assistant turn, followed by the tool results."""
    url, asked = tool_peer
    sdk = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
    history: list[dict[str, object]] = [{"role": "user", "content": "Weather in Paris?"}]
    try:
        first = await sdk.messages.create(model="m", max_tokens=50, messages=history)
        assert [b.type for b in first.content] == ["thinking", "text", "tool_use", "tool_use"]
        history += [
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_A", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_B", "content": "noon"}]},
        ]  # fmt: skip
        second = await sdk.messages.create(model="m", max_tokens=50, messages=history)
    finally:
        await sdk.close()
    assert second.stop_reason == "tool_use"
    assert asked[1]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"id": "call_A", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_B", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_A", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_B", "content": "noon"},
    ]  # fmt: skip


async def test_an_explicit_cancel_closes_the_block_and_says_cancelled(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.v1 + "/messages",
            json=message("cancel me [sim itl_ms=30 tokens=300]", stream=True),
        ) as resp:
            request_id = resp.headers["X-Request-Id"]
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and (
                frame.event != "content_block_delta"
            ):
                pass
            async with http.post(gateway.v1 + f"/requests/{request_id}/cancel") as cancel:
                assert cancel.status == 202
            frames = await reader.rest()
    events = [f.event for f in frames if f.event]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert frames[-2].json()["delta"]["stop_reason"] == "cancelled"
    (record,) = await gateway.sim.log.wait_for(1, outcome="reset")
    assert record.tokens_sent < 300


@asynccontextmanager
async def _before_an_anthropic_upstream(stop: dict[str, object]) -> AsyncIterator[str]:
    """A gateway's URL, in front of an Anthropic upstream that answers every
    request "one two" and ends it with ``stop``."""
    upstream = event_stream_upstream("/v1/messages", lambda body: _anthropic_events(stop))
    async with serving(upstream) as url, running_gateway(Settings(
        host="127.0.0.1", port=0, upstream_url=url + "/v1", upstream_format="anthropic",
        upstream_protocol="http1", error_ttl_ms=0,
    )) as (_, gateway_url):
        yield gateway_url


def _anthropic_events(stop: dict[str, object]) -> bytes:
    """An Anthropic stream with cache reads and writes, ended by ``stop``."""
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 5,
                      "cache_read_input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "one two"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": stop, "usage": {"output_tokens": 3}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


async def test_cache_writes_and_the_stop_sequence_reach_anthropic_clients():
    """What an Anthropic upstream reports beside the text: cache writes
    (billed apart, not in input_tokens) and the stop sequence that ended the
    answer, through /v1/messages streaming and not."""
    stop = {"stop_reason": "stop_sequence", "stop_sequence": "END"}

    async with _before_an_anthropic_upstream(stop) as gateway_url:
        sdk = anthropic.AsyncAnthropic(base_url=gateway_url, api_key="k", max_retries=0)
        try:
            whole = await sdk.messages.create(**message("whole"))
            async with sdk.messages.stream(**message("streamed")) as stream:
                streamed = await stream.get_final_message()
        finally:
            await sdk.close()
    for answer in (whole, streamed):
        assert answer.content[0].text == "one two"
        assert (answer.stop_reason, answer.stop_sequence) == ("stop_sequence", "END")
        usage = answer.usage
        assert (usage.input_tokens, usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens, usage.output_tokens) == (25, 5, 10, 3)


async def test_a_full_context_window_is_a_truncation_through_both_apis():
    """An Anthropic answer that filled the model's context window was cut
    short, as one that hit max_tokens."""
    stop = {"stop_reason": "model_context_window_exceeded", "stop_sequence": None}
    async with _before_an_anthropic_upstream(stop) as gateway_url:
        sdk = anthropic.AsyncAnthropic(base_url=gateway_url, api_key="k", max_retries=0)
        oai = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="k", max_retries=0)
        try:
            whole = await sdk.messages.create(**message("whole"))
            async with sdk.messages.stream(**message("streamed")) as stream:
                streamed = await stream.get_final_message()
            completion = await oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "chat"}])
            chunks = await oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "chat, streamed"}], stream=True)
            finishes = [c.choices[0].finish_reason async for c in chunks
                        if c.choices and c.choices[0].finish_reason]
        finally:
            await sdk.close()
            await oai.close()
    for answer in (whole, streamed):
        assert answer.content[0].text == "one two"
        assert (answer.stop_reason, answer.stop_sequence) == ("max_tokens", None)
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == (
        "one two", "length")
    assert finishes == ["length"]


async def test_an_upstream_that_never_answers_is_a_504_timeout_error():
    """The first-token deadline passed before the 200: Anthropic's type for
    a 504 is ``timeout_error`` (API reference, "Errors"), which its SDK
    shows; the status is what the SDK picks its exception by."""
    async with quiet_h2_peer(head=False) as peer:
        settings = gateway_settings(peer, upstream_first_token_timeout_ms=300)
        async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):  # generous: the deadline is 0.3 s
                async with http.post(url + "/v1/messages", json=message("never answered")) as resp:
                    status, body = resp.status, await resp.json()
            assert await asyncio.wait_for(peer.resets.get(), 5) == 1
    assert status == 504
    assert body == {"type": "error", "error": {
        "type": "timeout_error", "message": "the upstream sent no first token in time"}}
