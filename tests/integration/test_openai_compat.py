"""What the official OpenAI SDK sees besides the text: the resolved model,
the fingerprint, log probabilities, refusals and usage details, relayed from
the upstream streaming and not, and the model list."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pydantic
import pytest
from aiohttp import web

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.sim.app import MODELS
from gateway.sim.content import answer_tokens
from gateway.sim.formats import token_logprob
from tests.integration.conftest import FAST_SIM
from tests.integration.test_shutdown import gateway_process
from tests.loopback import event_stream_upstream, serving

EXTRAS = (
    "[sim resolved_model=gpt-real-2025 fingerprint=fp_sim logprobs=1 cached_tokens=3"
    " reasoning_tokens=2]"
)


def tokens(prompt: str) -> list[str]:
    return answer_tokens([{"role": "user", "content": prompt}], FAST_SIM.tokens)


@pytest.fixture
async def client(gateway):
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    yield sdk
    await sdk.close()


async def test_stream_relays_model_fingerprint_logprobs_and_usage_details(client):
    prompt = "extras " + EXTRAS
    stream = await client.chat.completions.create(
        model="gpt-real", messages=[{"role": "user", "content": prompt}], stream=True,
        logprobs=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {"gpt-real-2025"}
    assert {c.system_fingerprint for c in chunks} == {"fp_sim"}
    logprobs = [
        entry for c in chunks if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in logprobs] == [token_logprob(t) for t in tokens(prompt)]
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == 3
    assert usage.completion_tokens_details.reasoning_tokens == 2


async def test_completion_relays_model_fingerprint_logprobs_and_usage_details(client):
    prompt = "whole extras " + EXTRAS
    completion = await client.chat.completions.create(
        model="gpt-real", messages=[{"role": "user", "content": prompt}], logprobs=True,
    )
    assert completion.model == "gpt-real-2025"
    assert completion.system_fingerprint == "fp_sim"
    choice = completion.choices[0]
    assert choice.message.content == "".join(tokens(prompt))
    assert [e.model_dump() for e in choice.logprobs.content] == [
        token_logprob(t) for t in tokens(prompt)
    ]
    assert choice.logprobs.refusal is None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3
    assert completion.usage.completion_tokens_details.reasoning_tokens == 2


async def test_without_details_none_are_made_up(client):
    completion = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "plain"}],
    )
    assert completion.model == "sim"
    assert completion.system_fingerprint is None
    assert completion.choices[0].logprobs is None
    assert completion.usage.prompt_tokens_details is None
    assert completion.usage.completion_tokens_details is None


async def test_a_refusal_is_relayed_streaming_and_not(client):
    prompt = "refuse [sim refusal=1]"
    stream = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": prompt}], stream=True,
    )
    chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.refusal or "" for d in deltas) == "".join(tokens(prompt))
    assert all(not d.content for d in deltas)
    completion = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": prompt}],
    )
    message = completion.choices[0].message
    assert (message.content, message.refusal) == (None, "".join(tokens(prompt)))


async def test_an_answer_without_content_still_names_its_role(client):
    """The role chunk opens every answer, an empty one too: the SDK's
    accumulated message is then one an agent loop can send back."""
    messages = [{"role": "user", "content": "nothing to say [sim tokens=0]"}]
    async with client.chat.completions.stream(model="sim", messages=messages) as stream:
        async for _ in stream:
            pass
        completion = await stream.get_final_completion()
    (choice,) = completion.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "", "stop")
    again = await client.chat.completions.create(
        model="sim", messages=[*messages, choice.message.model_dump(exclude_none=True),
                               {"role": "user", "content": "and now?"}],
    )
    assert again.choices[0].message.content


async def test_the_same_prompt_gets_a_new_id_after_a_restart(sim_factory):
    """An answer's id is unique beyond its process: the same first request
    to a gateway started twice (a restart, or two workers) gets two ids."""
    sim = await sim_factory(FAST_SIM)
    body = {"model": "sim", "messages": [{"role": "user", "content": "same prompt, twice"}]}
    ids = []
    for _ in range(2):
        async with gateway_process(sim.url) as gateway, aiohttp.ClientSession() as http:
            for api, path in (("chatcmpl-", "/v1/chat/completions"), ("msg_", "/v1/messages")):
                payload = {**body, "max_tokens": 16} if api == "msg_" else body
                async with http.post(gateway.url + path, json=payload) as resp:
                    answer_id = (await resp.json())["id"]
                assert answer_id.startswith(api)
                ids.append(answer_id)
            gateway.process.terminate()
    assert len(set(ids)) == 4, ids


async def test_anthropic_upstream_model_and_cache_reads_are_relayed(gateway_factory):
    gateway = await gateway_factory(upstream_format="anthropic")
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    try:
        completion = await sdk.chat.completions.create(
            model="claude-x",
            messages=[{"role": "user",
                       "content": "cached [sim resolved_model=claude-x-1 cached_tokens=2]"}],
        )
    finally:
        await sdk.close()
    assert completion.model == "claude-x-1"
    assert completion.usage.prompt_tokens_details.cached_tokens == 2


# -- models -----------------------------------------------------------------------


async def test_models_keep_the_upstreams_created_and_owner(client):
    page = await client.models.list()
    assert [(m.id, m.created, m.owned_by) for m in page.data] == [
        (m["id"], m["created"], m["owned_by"]) for m in MODELS
    ]


async def test_models_retrieve_by_id_and_404_for_an_unknown_one(client, gateway):
    for listed in MODELS:
        retrieved = await client.models.retrieve(listed["id"])
        assert retrieved.model_dump(exclude_none=True) == listed
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert "no-such-model" in caught.value.message
    # The gateway keeps serving.
    assert (await client.models.retrieve("sim-1")).id == "sim-1"


async def test_anthropic_models_are_listed_in_openai_shape(gateway_factory):
    gateway = await gateway_factory(upstream_format="anthropic")
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    try:
        page = await sdk.models.list()
        retrieved = await sdk.models.retrieve("sim-org/sim-2")
    finally:
        await sdk.close()
    # Anthropic names no owner and dates models in RFC 3339.
    assert [(m.id, m.created, m.owned_by) for m in page.data] == [
        (m["id"], m["created"], "anthropic") for m in MODELS
    ]
    assert (retrieved.id, retrieved.created) == ("sim-org/sim-2", MODELS[1]["created"])


# -- an Anthropic upstream: translated or refused, never dropped ---------------------


async def test_anthropic_upstream_refuses_a_seed_and_takes_a_schema(gateway_factory):
    gateway = await gateway_factory(upstream_format="anthropic")
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "structured"}]
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="m", messages=messages, seed=7)
        assert caught.value.code == "unsupported_parameter"
        assert "'seed'" in caught.value.message
        with pytest.raises(openai.BadRequestError, match="json_object"):
            await sdk.chat.completions.create(
                model="m", messages=messages, response_format={"type": "json_object"}
            )
        completion = await sdk.chat.completions.create(
            model="m", messages=messages,
            response_format={"type": "json_schema", "json_schema": {
                "name": "a", "schema": {"type": "object", "additionalProperties": False}}},
        )
    finally:
        await sdk.close()
    assert completion.choices[0].message.content == "".join(tokens("structured"))
    # The refused requests never reached the upstream.
    assert len(gateway.sim.log.records) == 1


OUT_OF_ANTHROPICS_RANGE = [
    # OpenAI's temperature goes to 2, Anthropic's to 1.
    ("temperature", 1.5, 1, "'temperature' must be from 0 to 1 for an Anthropic upstream",
     "unsupported_value"),
    # Anthropic's top_k is an integer from 0; the chat route passes top_k on
    # unchecked (vLLM takes -1), so the translation checks it.
    ("top_k", 2.5, 5, "'top_k' must be an integer from 0 for an Anthropic upstream",
     "invalid_value"),
    ("top_k", -1, 0, "'top_k' must be an integer from 0 for an Anthropic upstream",
     "invalid_value"),
    ("top_k", "5", 5, "'top_k' must be an integer from 0 for an Anthropic upstream",
     "invalid_value"),
]


@pytest.mark.parametrize(("field", "refused", "taken", "message", "code"), OUT_OF_ANTHROPICS_RANGE)
async def test_anthropic_upstream_refuses_a_number_out_of_its_range(
    gateway_factory, field, refused, taken, message, code
):
    """A 400 before the upstream call, not a 200 and the upstream's refusal
    in-stream; the value at the range's end is answered."""
    gateway = await gateway_factory(upstream_format="anthropic")
    body = {"model": "m", "stream": True, field: refused,
            "messages": [{"role": "user", "content": "in range?"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=body) as resp:
            status, answer = resp.status, await resp.json()
        assert status == 400
        assert answer == {"error": {
            "message": message, "type": "invalid_request_error", "code": code}}
        assert gateway.sim.log.records == []
        async with http.post(gateway.v1 + "/chat/completions",
                             json={**body, field: taken, "stream": False}) as resp:
            assert resp.status == 200
    assert len(gateway.sim.log.records) == 1


async def test_anthropic_upstream_refuses_a_custom_tool_call_in_the_history(gateway_factory):
    """A custom tool's call carries free text, not a function's arguments:
    a tool_use block would lose the text and have no name."""
    gateway = await gateway_factory(upstream_format="anthropic")
    body = {"model": "m", "stream": True, "messages": [
        {"role": "user", "content": "grep"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "custom", "custom": {"name": "shell", "input": "ls -l"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=body) as resp:
            status, answer = resp.status, await resp.json()
    assert status == 400
    assert answer == {"error": {
        "message": "custom tool calls cannot be sent to an Anthropic upstream",
        "type": "invalid_request_error", "code": "unsupported_parameter"}}
    assert gateway.sim.log.records == []


async def test_a_server_without_model_urls_is_answered_from_its_list():
    """vLLM-style servers list models but have no /models/{id}: the gateway
    finds the model in the list instead."""
    listed = {"id": "meta/llama-3", "object": "model", "created": 1715000000, "owned_by": "vllm"}

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [listed]})

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    async with serving(app) as upstream:
        settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                            upstream_url=upstream + "/v1")
        async with running_gateway(settings) as (_, url):
            sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
            try:
                retrieved = await sdk.models.retrieve("meta/llama-3")
                with pytest.raises(openai.NotFoundError) as caught:
                    await sdk.models.retrieve("meta/other")
            finally:
                await sdk.close()
    assert retrieved.model_dump(exclude_none=True) == listed
    assert caught.value.code == "model_not_found"


async def test_a_model_list_nested_too_deep_is_the_upstreams_protocol_error():
    """JSON nested past the interpreter's recursion limit, as the list and
    as one model: the upstream's malformed answer (502), not a bug (500)."""
    deep = b"[" * 100_000 + b"]" * 100_000

    async def nested(request: web.Request) -> web.Response:
        return web.Response(body=deep, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", nested)
    app.router.add_get("/v1/models/{model_id}", nested)
    async with serving(app) as upstream:
        settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                            upstream_url=upstream + "/v1")
        async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:
            answers = []
            for path in ("/v1/models", "/v1/models/m"):
                async with http.get(url + path) as resp:
                    answers.append((resp.status, await resp.json()))
    error = {"message": "the upstream sent an answer the gateway could not read",
             "type": "upstream_error", "code": "upstream_protocol_error"}
    assert answers == [(502, {"error": error}), (502, {"error": error})]


def _chunks(*deltas: tuple[dict[str, object], str | None]) -> bytes:
    """An OpenAI stream of these (delta, finish_reason) chunks, then [DONE]."""
    frames = [
        json.dumps({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
                    "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        for delta, finish in deltas
    ]
    return b"".join(f"data: {frame}\n\n".encode() for frame in frames) + b"data: [DONE]\n\n"


#: By a word of the last message: a custom tool's call, a legacy
#: function_call, or (for a history sent back) plain text.
TOOL_STREAMS = {
    "custom": _chunks(
        ({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_sql", "type": "custom",
                                               "custom": {"name": "run_sql", "input": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "custom": {"input": "SELECT "}}]}, None),
        ({"tool_calls": [{"index": 0, "custom": {"input": "1;"}}]}, None),
        ({}, "tool_calls"),
    ),
    "legacy": _chunks(
        ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": ""}}, None),
        ({"function_call": {"arguments": '{"a": '}}, None),
        ({"function_call": {"arguments": "1}"}}, None),
        ({}, "function_call"),
    ),
    "text": _chunks(({"role": "assistant", "content": "done"}, None), ({}, "stop")),
}


async def test_custom_tool_calls_and_legacy_function_calls_are_relayed_and_taken_back():
    """What the SDK returns through the gateway is what it returns from the
    upstream itself, and the assistant message it built goes back as history."""

    def answer(body: Mapping[str, Any]) -> bytes:
        last = str(body["messages"][-1].get("content") or "")
        return TOOL_STREAMS[next((k for k in TOOL_STREAMS if k in last), "text")]

    upstream = event_stream_upstream("/v1/chat/completions", answer)
    async with serving(upstream) as url, running_gateway(Settings(
        host="127.0.0.1", port=0, upstream_url=url + "/v1", upstream_protocol="http1",
        error_ttl_ms=0,
    )) as (_, gateway_url):
        direct = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        through = openai.AsyncOpenAI(base_url=gateway_url + "/v1", api_key="k", max_retries=0)
        try:
            answers, fragments = {}, {}
            for word in ("custom", "legacy"):
                for name, sdk in (("direct", direct), ("gateway", through)):
                    messages = [{"role": "user", "content": f"{word} please ({name})"}]
                    stream = await sdk.chat.completions.create(model="m", messages=messages, stream=True)
                    deltas = [chunk.choices[0].delta.model_dump(exclude_none=True)
                              async for chunk in stream if chunk.choices]
                    fragments[word, name] = [
                        {k: v for k, v in d.items() if k in ("tool_calls", "function_call")}
                        for d in deltas if "tool_calls" in d or "function_call" in d
                    ]
                whole = await through.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"{word} please, whole"}])
                answers[word] = whole.choices[0].model_dump(exclude_none=True)
                message = answers[word]["message"]
                history = [{"role": "user", "content": f"{word} please"}, message,
                           {"role": "function", "name": "f", "content": "2"} if word == "legacy"
                           else {"role": "tool", "tool_call_id": "call_sql", "content": "1"}]
                again = await through.chat.completions.create(model="m", messages=history)
                assert again.choices[0].message.content == "done"
        finally:
            await direct.close()
            await through.close()
    assert answers["custom"]["finish_reason"] == "tool_calls"
    assert answers["custom"]["message"]["tool_calls"] == [
        {"id": "call_sql", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1;"}}]
    assert (answers["legacy"]["finish_reason"], answers["legacy"]["message"]["function_call"]) == (
        "function_call", {"name": "f", "arguments": '{"a": 1}'})
    for word in ("custom", "legacy"):
        assert len(fragments[word, "direct"]) == 3
        assert fragments[word, "gateway"] == fragments[word, "direct"], word


# -- an Anthropic upstream, scripted ------------------------------------------------


def _anthropic_stream(blocks: list[dict[str, Any]], stop_reason: str) -> bytes:
    """An Anthropic event stream: ``blocks`` (content block events), then
    ``stop_reason``."""
    events = [
        {"type": "message_start", "message": {
            "id": "msg_up", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}},
        *blocks,
        {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
         "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@asynccontextmanager
async def _anthropic_upstream(answer: bytes, asked: list[Mapping[str, Any]]) -> AsyncIterator[str]:
    """A gateway in front of an Anthropic upstream that answers every request
    with ``answer`` and keeps the bodies it was sent in ``asked``; yields the
    gateway's URL."""

    def reply(body: Mapping[str, Any]) -> bytes:
        asked.append(body)
        return answer

    upstream = event_stream_upstream("/v1/messages", reply)
    async with serving(upstream) as url, running_gateway(Settings(
        host="127.0.0.1", port=0, upstream_url=url + "/v1", upstream_format="anthropic",
        upstream_protocol="http1", error_ttl_ms=0,
    )) as (_, gateway_url):
        yield gateway_url


#: A call of a tool without parameters, as Anthropic streams it: its input
#: ({}) comes as a single empty input_json_delta.
NO_INPUT_TOOL_CALL = _anthropic_stream([
    {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}},
    {"type": "content_block_delta", "index": 0,
     "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_stop", "index": 0},
], "tool_use")  # fmt: skip


async def test_a_tool_call_without_arguments_from_anthropic_has_json_arguments():
    tools = [{"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    async with _anthropic_upstream(NO_INPUT_TOOL_CALL, []) as url:
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        try:
            whole = await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "time?"}], tools=tools)
            stream = await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "time, streamed?"}], tools=tools,
                stream=True)
            fragments = [call.model_dump(exclude_none=True) async for chunk in stream
                         if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
        finally:
            await sdk.close()
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.model_dump(exclude_none=True)["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    assert fragments == [
        {"index": 0, "id": "toolu_1", "type": "function",
         "function": {"name": "get_time", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]  # fmt: skip


class Weather(pydantic.BaseModel):
    city: str


#: A plain text answer.
TEXT_ANSWER = _anthropic_stream([
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
], "end_turn")  # fmt: skip


async def test_a_strict_function_is_a_strict_anthropic_tool():
    """The SDK's pydantic_function_tool marks every function strict."""
    asked: list[Mapping[str, Any]] = []
    async with _anthropic_upstream(TEXT_ANSWER, asked) as url:
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        try:
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "weather?"}],
                tools=[openai.pydantic_function_tool(Weather)])
        finally:
            await sdk.close()
    (body,) = asked
    assert body["tools"] == [{
        "name": "Weather",
        "input_schema": {"type": "object", "title": "Weather", "properties": {
            "city": {"type": "string", "title": "City"}},
            "required": ["city"], "additionalProperties": False},
        "strict": True,
    }]  # fmt: skip


async def _chat_through_anthropic(
    body: Mapping[str, Any],
) -> tuple[int, bytes, list[Mapping[str, Any]]]:
    """``body`` posted to a gateway in front of an Anthropic upstream that
    answers TEXT_ANSWER: the status, the answer, what the upstream was asked."""
    asked: list[Mapping[str, Any]] = []
    async with _anthropic_upstream(TEXT_ANSWER, asked) as url, aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            return resp.status, await resp.read(), asked


@pytest.mark.parametrize("fields", [{"tool_choice": "none"}, {"parallel_tool_calls": False},
                                    {"tools": []}],
                         ids=["none", "no parallel calls", "empty tools"])
async def test_tool_settings_without_tools_do_not_reach_an_anthropic_upstream(fields):
    """With no tools, "none" and no parallel calls mean no tool call either:
    answered, and the upstream gets no tool_choice it would refuse."""
    body = {"model": "m", "stream": True, **fields,
            "messages": [{"role": "user", "content": "no tools"}]}
    status, answer, asked = await _chat_through_anthropic(body)
    assert status == 200
    assert answer.endswith(b"data: [DONE]\n\n")
    (sent,) = asked
    assert "tool_choice" not in sent and "tools" not in sent


_BLANK_STOP = ("'stop' sequences must have a character other than whitespace "
               "for an Anthropic upstream")
_NO_TURN = "'messages' must hold a user or assistant message with content for an Anthropic upstream"
_HELLO = [{"role": "user", "content": "stop at a blank"}]


@pytest.mark.parametrize(("body", "message"), [
    ({"stop": "\n", "messages": _HELLO}, _BLANK_STOP),
    ({"stop": ["END", "\n\n"], "messages": _HELLO}, _BLANK_STOP),
    ({"stop": " \t", "messages": _HELLO}, _BLANK_STOP),
    ({"stop": "", "messages": _HELLO}, _BLANK_STOP),
    ({"messages": [{"role": "system", "content": "Say hello."}]}, _NO_TURN),
    ({"messages": [{"role": "developer", "content": "Say hello."},
                   {"role": "user", "content": ""}]}, _NO_TURN),
], ids=["a newline stop", "a list of stops with blank lines", "a blank stop", "an empty stop",
        "a system message alone", "an empty user message"])  # fmt: skip
async def test_what_an_anthropic_upstream_refuses_is_a_400_before_it(body, message):
    """Anthropic refuses a stop sequence with no visible character (OpenAI
    clients send "\\n" often), and a chat with no message besides the system
    prompt (OpenAI answers a system prompt alone; empty messages are not
    sent): refused here, not after the 200, and not dropped, which would
    answer past the stop the client asked for."""
    status, answer, asked = await _chat_through_anthropic({"model": "m", "stream": True, **body})
    assert status == 400
    assert json.loads(answer) == {"error": {
        "message": message, "type": "invalid_request_error", "code": "unsupported_value"}}
    assert asked == []


async def test_blank_text_is_not_sent_to_an_anthropic_upstream():
    """Anthropic refuses a text block of whitespace only; it says nothing,
    so it is left out as an empty one is (the turns around it then meet)."""
    body = {"model": "m", "stream": True, "messages": [
        {"role": "system", "content": "  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\n"},
        {"role": "user", "content": [{"type": "text", "text": " \t"},
                                     {"type": "text", "text": " again "}]},
    ]}  # fmt: skip
    status, answer, asked = await _chat_through_anthropic(body)
    assert status == 200
    assert answer.endswith(b"data: [DONE]\n\n")
    (sent,) = asked
    assert "system" not in sent
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": " again "}]}]
