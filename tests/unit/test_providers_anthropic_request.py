"""OpenAI chat request -> Anthropic Messages request: exact bodies and headers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import BadRequest
from gateway.upstream.providers import AnthropicProvider


def translate(chat: dict[str, Any]) -> dict[str, Any]:
    request = AnthropicProvider().build_request(chat, base_path="/v1", api_key=None)
    body: dict[str, Any] = json.loads(request.body)
    return body


def test_request_line_headers_and_compact_body() -> None:
    chat = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Grüß dich"}]}
    request = AnthropicProvider().build_request(chat, base_path="/v1/", api_key="sk-ant-secret")
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.headers == (
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("anthropic-version", "2023-06-01"),
        ("x-api-key", "sk-ant-secret"),
    )
    assert request.body == (
        b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"Gr\xc3\xbc\xc3\x9f '
        b'dich"}],"max_tokens":4096,"stream":true}'
    )
    assert b"sk-ant-secret" not in request.body


def test_no_api_key_no_key_header() -> None:
    request = AnthropicProvider().build_request(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}, base_path="", api_key=None
    )
    assert request.path == "/messages"
    assert [name for name, _ in request.headers] == [
        "content-type",
        "accept",
        "anthropic-version",
    ]


def test_full_conversation_with_tools() -> None:
    chat = {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather and time in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "now", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C, cloudy"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "14:05"}],
            },
            {"role": "user", "content": "Thanks!"},
        ],
        "max_completion_tokens": 512,
        "max_tokens": 99,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["\n\nHuman:", "END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            },
            {"type": "function", "function": {"name": "now"}},
        ],
        "tool_choice": "required",
        "user": "user-42",
        "stream": False,
        "n": 1,
    }
    assert translate(chat) == {
        "model": "claude-sonnet-4-5",
        "system": "You are terse.\n\nAnswer in French.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather and time in Paris?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
                ],
            },
            {
                "role": "user",  # tool results first, then the user's text: one turn
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C, cloudy"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05"},
                    {"type": "text", "text": "Thanks!"},
                ],
            },
        ],
        "max_tokens": 512,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["\n\nHuman:", "END"],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather",
                "input_schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
            {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "any"},
        "metadata": {"user_id": "user-42"},
        "stream": True,
    }


def test_assistant_tool_call_without_text_and_empty_messages() -> None:
    chat = {
        "model": "m",
        "messages": [
            {"role": "user", "content": ""},  # says nothing: dropped
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
        ],
        "max_tokens": 10,
        "stop": "STOP",
    }
    body = translate(chat)
    assert body["messages"] == [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}],
        },
    ]
    assert (body["max_tokens"], body["stop_sequences"]) == (10, ["STOP"])
    assert "system" not in body


@pytest.mark.parametrize("fields", [{"tool_choice": "auto"}, {"tool_choice": "none"},
                                    {"tool_choice": "auto", "parallel_tool_calls": False}])
def test_without_tools_a_choice_of_no_call_is_left_out(fields: dict[str, Any]) -> None:
    """Anthropic refuses a tool_choice without tools."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    assert "tool_choice" not in translate(chat)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_without_tools_a_call_that_must_be_made_is_refused(choice: Any) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
    with pytest.raises(BadRequest, match="'tool_choice' needs tools for an Anthropic upstream"):
        translate(chat)


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice(tool_choice: Any, parallel: bool | None, expected: Any) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    if tool_choice is not None:
        chat["tool_choice"] = tool_choice
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel
    assert translate(chat).get("tool_choice") == expected


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "function", "name": "f", "content": "x"}, "role 'function'"),
        ({"role": "user", "content": [{"type": "input_audio"}]}, "'input_audio'"),
        ({"role": "system", "content": [{"type": "image_url"}]}, "only contain text"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x,y"}}]},
         "base64"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
          "arguments": "{not json"}}]}, "arguments must be a JSON object"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
          "arguments": "[1]"}}]}, "arguments must be a JSON object"),
        ("not a message", "must be an object"),
    ],
)  # fmt: skip
def test_untranslatable_requests_are_bad_requests(message: Any, error: str) -> None:
    with pytest.raises(BadRequest, match=error):
        translate({"model": "m", "messages": [message]})


def test_non_function_tools_and_odd_tool_choice_are_bad_requests() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(BadRequest, match="type 'function'"):
        translate({**base, "tools": [{"type": "web_search"}]})
    with pytest.raises(BadRequest, match="tool_choice"):
        translate({**base, "tool_choice": "sometimes"})


@pytest.mark.parametrize("strict", [True, False])
def test_a_functions_strict_switch_is_its_tools(strict: bool) -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"], "additionalProperties": False}
    body = translate({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "wx", "parameters": parameters, "strict": strict}},
        {"type": "function", "function": {"name": "now", "strict": None}},
    ]})  # fmt: skip
    assert body["tools"] == [
        {"name": "wx", "input_schema": parameters, "strict": strict},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    with pytest.raises(BadRequest, match="strict"):
        translate({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "wx", "strict": "yes"}}]})


# -- prompt caching, structured outputs, what has no equivalent ------------------------

EPHEMERAL = {"type": "ephemeral"}


def test_cache_control_stays_on_the_block_it_marks() -> None:
    body = translate({
        "model": "m",
        "messages": [
            {"role": "system", "content": [
                {"type": "text", "text": "A long manual.", "cache_control": EPHEMERAL},
            ]},
            {"role": "user", "content": [
                {"type": "text", "text": "Question", "cache_control": {"type": "ephemeral",
                                                                        "ttl": "1h"}},
            ]},
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "text", "text": "result", "cache_control": EPHEMERAL},
            ]},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"},
                 "cache_control": EPHEMERAL},
            ]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": EPHEMERAL}],
    })  # fmt: skip
    assert body["system"] == [{"type": "text", "text": "A long manual.", "cache_control": EPHEMERAL}]
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Question", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": [
                {"type": "text", "text": "result", "cache_control": EPHEMERAL},
            ]},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"},
             "cache_control": EPHEMERAL},
        ]},
    ]  # fmt: skip
    assert body["tools"] == [
        {"name": "f", "input_schema": {"type": "object", "properties": {}},
         "cache_control": EPHEMERAL}
    ]  # fmt: skip


def test_without_cache_marks_system_stays_a_string() -> None:
    body = translate({"model": "m", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "developer", "content": "c"},
        {"role": "user", "content": "x"},
    ]})  # fmt: skip
    assert body["system"] == "a\nb\n\nc"


def test_a_cache_mark_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest, match="cache_control"):
        translate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "yes"}]},
        ]})  # fmt: skip


def test_json_schema_response_format_becomes_output_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    body = translate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 5,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "strict": True, "schema": schema}},
    })  # fmt: skip
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert body["top_k"] == 5
    plain = translate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "text"}, "frequency_penalty": 0,
                       "logprobs": False, "n": 1, "seed": None})
    assert "output_config" not in plain


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"seed": 7}, "'seed'"),
        ({"response_format": {"type": "json_object"}}, "'json_object'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"logprobs": True}, "'logprobs'"),
        ({"top_logprobs": 2}, "'top_logprobs'"),
        ({"presence_penalty": 0.5}, "'presence_penalty'"),
        ({"logit_bias": {"1": 5}}, "'logit_bias'"),
        ({"n": 2}, "'n'"),
        ({"brand_new_knob": 1}, "'brand_new_knob'"),
    ],
)  # fmt: skip
def test_what_anthropic_cannot_do_is_refused_naming_the_field(
    extra: dict[str, Any], named: str
) -> None:
    with pytest.raises(BadRequest, match=named) as caught:
        translate({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
    assert caught.value.status == 400
