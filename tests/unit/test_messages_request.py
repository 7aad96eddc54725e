"""An Anthropic Messages body read as the OpenAI chat request it means: the
prompt key it shares with the chat API, what is kept, what is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.api.chat_request import parse_chat_request
from gateway.api.messages_request import parse_messages_request
from gateway.errors import BadRequest
from gateway.keys import prompt_key
from gateway.upstream.providers.anthropic_request import translate_chat


def read(body: dict[str, Any]) -> dict[str, Any]:
    return parse_messages_request(json.dumps(body).encode()).body


BASE = {"model": "m", "max_tokens": 10}


@pytest.mark.parametrize(
    "content", ["Hi", [{"type": "text", "text": "Hi"}]], ids=["string", "one-text-block"]
)
def test_the_same_question_has_the_chat_apis_key(content: Any) -> None:
    chat = parse_chat_request(json.dumps({
        "model": "m", "max_tokens": 10, "stream": True,
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
    }).encode())  # fmt: skip
    messages = parse_messages_request(json.dumps({
        **BASE, "system": "S", "messages": [{"role": "user", "content": content}],
    }).encode())  # fmt: skip
    assert prompt_key(messages.body, tenant="t") == prompt_key(chat.body, tenant="t")
    assert not messages.stream


def test_images_cache_marks_and_output_format_are_kept() -> None:
    mark = {"type": "ephemeral"}
    schema = {"type": "object", "additionalProperties": False}
    chat = read({
        **BASE, "top_k": 3,
        "system": [{"type": "text", "text": "Manual", "cache_control": mark}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBO"}},
            {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"},
             "cache_control": mark},
            {"type": "text", "text": "What?", "cache_control": mark},
        ]}],
    })  # fmt: skip
    assert chat["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Manual", "cache_control": mark}]},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            {"type": "image_url", "image_url": {"url": "https://e.com/a.png"},
             "cache_control": mark},
            {"type": "text", "text": "What?", "cache_control": mark},
        ]},
    ]  # fmt: skip
    assert chat["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema}
    }
    assert chat["top_k"] == 3


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "'max_tokens'"),
        ({**BASE, "messages": []}, "'messages'"),
        ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages\\[0\\].role"),
        ({**BASE, "thinking": {"type": "enabled", "budget_tokens": 1024},
          "messages": [{"role": "user", "content": "x"}]}, "'thinking'"),
        ({**BASE, "messages": [{"role": "user", "content": [
            {"type": "thinking", "thinking": "t", "signature": "s"}]}]}, "'thinking'"),
        ({**BASE, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
         "'document'"),
        ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
          "messages": [{"role": "user", "content": "x"}]}, "server tool"),
        ({**BASE, "tool_choice": {"type": "tool"}, "messages": [{"role": "user", "content": "x"}]},
         "tool_choice"),
        ({**BASE, "tools": [{"name": "f", "input_schema": {"type": "object"}, "strict": 1}],
          "messages": [{"role": "user", "content": "x"}]}, "tools\\[0\\].strict"),
        ({**BASE, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x", "cache_control": "yes"}]}]}, "cache_control"),
    ],
)  # fmt: skip
def test_what_has_no_equivalent_is_refused_by_name(body: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest, match=named):
        read(body)


def test_an_assistant_turns_thinking_is_dropped() -> None:
    """An answer's content sent back as it came (the tool loop): its
    reasoning goes no further, the rest of the turn does."""
    chat = read({**BASE, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Let me check.", "signature": ""},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_A", "name": "wx", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_A", "content": "sunny"}]},
    ]})  # fmt: skip
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_A", "type": "function",
             "function": {"name": "wx", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_A", "content": "sunny"},
    ]  # fmt: skip


def test_an_anthropic_upstream_gets_back_what_the_client_sent() -> None:
    """Messages body -> chat request -> Messages body: the parts both APIs
    can say come back as they were sent."""
    mark = {"type": "ephemeral"}
    schema = {"type": "object", "additionalProperties": False}
    sent = {
        **BASE, "top_k": 4, "temperature": 0.5, "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "Manual", "cache_control": mark}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}},
                   "strict": True, "cache_control": mark}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Q", "cache_control": mark}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "R"}]},
        ],
    }  # fmt: skip
    back = translate_chat(read(sent))
    assert back == {**sent, "stream": True}
