"""Request bodies the upstream would choke on: a 400 naming the field, before
anything goes upstream, one log line, and the server keeps serving."""

from __future__ import annotations

import json

import aiohttp
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.integration.test_gateway_errors import assert_still_serving, error_shape


def _body(**fields: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def _content(parts: object) -> bytes:
    return _body(messages=[{"role": "user", "content": parts}])


#: (case, raw body, the field the message must name, code)
INVALID = [
    ("content part 1", _content([1]), "messages[0].content[0]", "invalid_value"),
    ("content part null", _content([None]), "messages[0].content[0]", "invalid_value"),
    ("text part without text", _content([{"type": "text"}]), "messages[0].content[0].text",
     "invalid_value"),
    ("unknown part type", _content([{"type": "hologram", "hologram": {}}]),
     "messages[0].content[0].type", "invalid_value"),
    ("empty content list", _content([]), "messages[0].content", "invalid_value"),
    ("tool_choice 5", _body(tool_choice=5), "tool_choice", "invalid_value"),
    # OpenAI and vLLM refuse it: streaming, after the 200.
    ("tool_choice without tools", _body(tool_choice="auto"),
     "'tool_choice' is only allowed when 'tools' are specified", "invalid_value"),
    ("tool_choice of a function without tools",
     _body(tool_choice={"type": "function", "function": {"name": "f"}}),
     "'tool_choice' is only allowed when 'tools' are specified", "invalid_value"),
    ("response_format a string", _body(response_format="json"), "response_format",
     "invalid_value"),
    # OpenAI and vLLM require the schema's name: streaming, their refusal
    # would come after the 200.
    ("json_schema without a name",
     _body(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
     "'response_format.json_schema.name' must be a string", "invalid_value"),
    ("seed a string", _body(seed="x"), "seed", "invalid_value"),
    ("logit_bias a list", _body(logit_bias=[1]), "logit_bias", "invalid_value"),
    ("n above 1", _body(n=3), "n", "unsupported_value"),
    ("temperature above 2", _body(temperature=2.5), "'temperature' must be a number from 0 to 2",
     "invalid_value"),
    ("temperature below 0", _body(temperature=-0.5), "'temperature' must be a number from 0 to 2",
     "invalid_value"),
    ("top_p above 1", _body(top_p=1.5), "'top_p' must be a number from 0 to 1", "invalid_value"),
    ("frequency_penalty above 2", _body(frequency_penalty=2.5),
     "'frequency_penalty' must be a number from -2 to 2", "invalid_value"),
    ("presence_penalty below -2", _body(presence_penalty=-3),
     "'presence_penalty' must be a number from -2 to 2", "invalid_value"),
    ("tool call without an id", _body(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "x"}]),
     "'messages[1].tool_calls[0].id' must be a string", "invalid_value"),
    ("top_logprobs without logprobs", _body(top_logprobs=3),
     "'top_logprobs' needs 'logprobs': true", "invalid_value"),
    ("top_logprobs with logprobs false", _body(top_logprobs=3, logprobs=False),
     "'top_logprobs' needs 'logprobs': true", "invalid_value"),
    ("lone surrogate", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content", "invalid_value"),
    ("lone surrogate in a part",
     b'{"model": "m", "messages": [{"role": "user", "content": '
     b'[{"type": "text", "text": "a\\udfffb"}]}]}',
     "messages[0].content[0].text", "invalid_value"),
    ("invalid UTF-8", b'{"model": "m\xff", "messages": [{"role": "user", "content": "hi"}]}',
     "UTF-8", "invalid_encoding"),
    ("encoded surrogate", b'{"model": "m\xed\xa0\x80", "messages": []}', "UTF-8",
     "invalid_encoding"),
]


@pytest.mark.parametrize(("case", "body", "field", "code"), INVALID, ids=[c[0] for c in INVALID])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/stream"])
async def test_an_invalid_field_is_a_400_naming_it(gateway, path, case, body, field, code):
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.url + path, data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400
                error = error_shape(await resp.json())
        assert error["code"] == code
        assert field in error["message"]
        assert error["type"] == "invalid_request_error"
        assert [line["status"] for line in logs if line["event"] == "request"] == [400]
        assert not [line for line in logs if line.get("log_level") in ("error", "critical")]
        await assert_still_serving(http, gateway.v1)
    assert len(gateway.sim.log.records) == 1  # only the good request went upstream


@pytest.mark.parametrize("fields", [{"n": 1}, {"n": None}, {}, {"tool_choice": "none"},
                                    {"temperature": 2, "top_p": 0},
                                    {"frequency_penalty": -2, "presence_penalty": 2},
                                    {"logprobs": True, "top_logprobs": 2},
                                    {"seed": 7, "logit_bias": {"50256": -100},
                                                   "tool_choice": "auto", "tools": [{
                                                       "type": "function",
                                                       "function": {"name": "f"}}],
                                                   "response_format": {"type": "json_object"}}])
async def test_valid_fields_pass(gateway, fields):
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "parts pass"}]}], **fields}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"]
