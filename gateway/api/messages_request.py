"""An Anthropic Messages request, read as the OpenAI chat request it means.

``POST /v1/messages`` rides on the same actors as ``/v1/chat/completions``:
its body is normalized into the OpenAI chat body the rest of the gateway
speaks (the prompt key, the providers), so the same question asked through
either API is one upstream call (Anthropic API reference, "Messages"):

- ``system`` (a string or text blocks) becomes the leading system message;
- ``tool_use`` blocks become the assistant's ``tool_calls``; ``tool_result``
  blocks become ``tool`` messages, ahead of the rest of their user turn;
- a turn of one plain text block becomes a string, as an OpenAI client
  writes it, so both spellings share a key;
- ``cache_control`` stays on the part it marks; ``output_config.format``
  becomes ``response_format``, a tool's ``strict`` its function's
  ``strict``; ``stop_sequences``, ``tool_choice``,
  ``metadata.user_id`` are renamed;
- ``thinking`` and ``redacted_thinking`` blocks of an assistant turn are
  dropped (below).

What has no OpenAI spelling (the ``thinking`` parameter, server tools,
documents) is refused with a 400 naming the field: the answer would
otherwise ignore it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.api.chat_request import ChatRequest, parse_json_object
from gateway.errors import BadRequest

Part = dict[str, Any]

#: Blocks of an assistant turn that are the model's reasoning, not its answer.
_THINKING = ("thinking", "redacted_thinking")

#: Top-level fields read below; any other is refused by name.
_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "tools", "tool_choice", "metadata", "output_config",
})  # fmt: skip

#: A custom tool's fields read by _tools; any other is refused by name.
#: eager_input_streaming only changes how the input is streamed, not what it is.
_TOOL_FIELDS = frozenset({
    "name", "description", "input_schema", "type", "strict", "cache_control",
    "eager_input_streaming",
})  # fmt: skip


def parse_messages_request(raw: bytes) -> ChatRequest:
    """The OpenAI chat request equivalent to an Anthropic Messages body."""
    body = parse_json_object(raw)
    for name, value in body.items():
        # A null field is one left out; thinking disabled is the default.
        if name not in _FIELDS and value is not None and not _thinking_off(name, value):
            raise _field(name, "is not supported by this gateway's Messages API")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _field("model", "must be a non-empty string")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _field("max_tokens", "must be a positive integer")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _field("stream", "must be a boolean")
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    chat.update(_sampling(body))
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _field("stop_sequences", "must be a list of strings")
        if stop:
            chat["stop"] = stop
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    if tools:
        # An empty list is no tools to Anthropic; OpenAI refuses an empty array.
        chat["tools"] = tools
    chat.update(_tool_choice(body.get("tool_choice"), has_tools=bool(tools)))
    user = _user(body.get("metadata"))
    if user is not None:
        chat["user"] = user
    response_format = _response_format(body.get("output_config"))
    if response_format is not None:
        chat["response_format"] = response_format
    chat["stream"] = stream
    return ChatRequest(body=chat, stream=stream, include_usage=False)


def _thinking_off(name: str, value: Any) -> bool:
    """``thinking: {"type": "disabled"}``: no extended thinking, which is what
    a request without the parameter gets (API reference, "Messages")."""
    return name == "thinking" and value == {"type": "disabled"}


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """temperature, top_p and top_k, within Anthropic's ranges (API reference,
    "Messages"): an OpenAI upstream takes a temperature up to 2, so the range
    is checked here, not left to whichever upstream answers."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _field(name, "must be a number from 0 to 1")
        out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise _field("top_k", "must be a non-negative integer")
        out["top_k"] = top_k
    return out


def _field(name: str, problem: str) -> BadRequest:
    return BadRequest(f"'{name}' {problem}", code="invalid_value")


def _cache_control(block: Mapping[str, Any], part: Part, where: str) -> Part:
    mark = block.get("cache_control")
    if mark is not None:
        if not isinstance(mark, Mapping):
            raise _field(f"{where}.cache_control", "must be an object")
        part["cache_control"] = dict(mark)
    return part


def _blocks(content: Any, where: str) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise _field(where, "must be a string or a list of content blocks")
    return content


def _text_part(block: Mapping[str, Any], where: str) -> Part:
    text = block.get("text")
    if not isinstance(text, str):
        raise _field(f"{where}.text", "must be a string")
    return _cache_control(block, {"type": "text", "text": text}, where)


def _content(parts: list[Part]) -> str | list[Part]:
    """One plain text part is a string: the spelling OpenAI clients use."""
    if len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]:
        text: str = parts[0]["text"]
        return text
    return parts


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "":
        return []
    parts = []
    for index, block in enumerate(_blocks(system, "system")):
        if block.get("type") != "text":
            raise _field(f"system[{index}]", "must be a text block")
        parts.append(_text_part(block, f"system[{index}]"))
    # No blocks is no system prompt, as "" is (OpenAI refuses an empty list).
    return [{"role": "system", "content": _content(parts)}] if parts else []


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _field("messages", "must be a non-empty list")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise _field(where, "must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _field(f"{where}.role", "must be 'user' or 'assistant'")
        content = message.get("content")
        # Anthropic's rule: every turn has content but a final assistant turn
        # (the start of the answer, which may be empty: then it says nothing).
        prefill = role == "assistant" and index == len(messages) - 1
        if content in ("", []) and not prefill:
            raise _field(f"{where}.content", "must not be empty (only a final assistant turn may be)")
        parts: list[Part] = []
        tool_calls: list[dict[str, Any]] = []
        for position, block in enumerate(_blocks(content, f"{where}.content")):
            at = f"{where}.content[{position}]"
            kind = block.get("type")
            if kind == "text":
                part = _text_part(block, at)
                if part["text"]:
                    parts.append(part)
                elif not prefill:
                    raise _field(f"{at}.text", "must not be empty")
            elif kind == "image" and role == "user":
                parts.append(_cache_control(block, _image_part(block, at), at))
            elif kind == "tool_use" and role == "assistant":
                tool_calls.append(_tool_call(block, at))
            elif kind in _THINKING and role == "assistant":
                # A client sends an answer's content back as it came, thinking
                # included (the tool loop of Anthropic's "Tool use" guide). It
                # cannot go further: an OpenAI upstream takes no reasoning as
                # input, and an Anthropic upstream checks a signature only it
                # issues (and reads thinking only with the `thinking`
                # parameter, which is refused here).
                continue
            elif kind == "tool_result" and role == "user":
                # A tool's answer is a message of its own in OpenAI's API,
                # and it must follow the assistant turn that asked for it.
                out.append(_tool_message(block, at))
            else:
                raise _field(f"{at}.type", f"{kind!r} is not supported in a {role} message")
        if role == "assistant":
            if parts or tool_calls:
                assistant: dict[str, Any] = {
                    "role": "assistant",
                    "content": _content(parts) if parts else None,
                }
                if tool_calls:
                    assistant["tool_calls"] = tool_calls
                out.append(assistant)
        elif parts:
            out.append({"role": "user", "content": _content(parts)})
    return out


def _image_part(block: Mapping[str, Any], where: str) -> Part:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise _field(f"{where}.source", "must be an object")
    if source.get("type") == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise _field(f"{where}.source", "needs a media_type and base64 data")
        # RFC 2397 data URL: what the Anthropic translation reads back.
        url = f"data:{media_type};base64,{data}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _field(f"{where}.source.type", "must be 'base64' or 'url'")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_call(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise _field(where, "needs a string id and name")
    if not isinstance(tool_input, Mapping):
        raise _field(f"{where}.input", "must be an object")
    arguments = json.dumps(tool_input, separators=(",", ":"), ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_message(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _field(f"{where}.tool_use_id", "must be a string")
    if block.get("is_error"):
        raise _field(f"{where}.is_error", "has no equivalent in the OpenAI API this gateway speaks")
    content = block.get("content")
    parts: list[Part] = []
    if content is not None and content != "":
        for position, inner in enumerate(_blocks(content, f"{where}.content")):
            if inner.get("type") != "text":
                raise _field(f"{where}.content[{position}]", "must be a text block")
            parts.append(_text_part(inner, f"{where}.content[{position}]"))
    if "cache_control" in block and parts:
        _cache_control(block, parts[-1], where)
    return {"role": "tool", "tool_call_id": call_id, "content": _content(parts) if parts else ""}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _field("tools", "must be a list")
    out = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
            raise _field(where, "must be an object with a string name")
        if tool.get("type") not in (None, "custom"):
            raise _field(f"{where}.type", f"server tool {tool['type']!r} is not supported")
        for name in tool:
            if name not in _TOOL_FIELDS and tool[name] is not None:
                raise _field(f"{where}.{name}", "is not supported by this gateway's Messages API")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            raise _field(f"{where}.input_schema", "must be an object")
        function: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = dict(schema)
        # Strict tool use: OpenAI's function.strict means the same.
        strict = tool.get("strict")
        if strict is not None:
            if not isinstance(strict, bool):
                raise _field(f"{where}.strict", "must be a boolean")
            function["strict"] = strict
        out.append(_cache_control(tool, {"type": "function", "function": function}, where))
    return out


def _tool_choice(choice: Any, *, has_tools: bool) -> dict[str, Any]:
    if choice is None:
        return {}
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    else:
        raise _field("tool_choice.type", "must be 'auto', 'any', 'tool' (with a name) or 'none'")
    if not has_tools:
        # Anthropic's API and OpenAI's both refuse a tool_choice with no
        # tools; streaming, an upstream's refusal would come after the 200.
        # "none" is what no tools means already: nothing to send.
        if kind == "none":
            return {}
        raise _field("tool_choice", "may only be given with tools")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False
    return out


def _user(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise _field("metadata", "must be an object")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise _field("metadata.user_id", "must be a string")
    return user or None


def _response_format(output_config: Any) -> dict[str, Any] | None:
    if output_config is None:
        return None
    if not isinstance(output_config, Mapping):
        raise _field("output_config", "must be an object")
    for name in output_config:
        if name != "format":
            raise _field(f"output_config.{name}", "is not supported by this gateway")
    output_format = output_config.get("format")
    if output_format is None:
        return None
    if not isinstance(output_format, Mapping):
        raise _field("output_config.format", "must be an object")
    schema = output_format.get("schema")
    if output_format.get("type") != "json_schema" or not isinstance(schema, Mapping):
        raise _field("output_config.format", "must be a json_schema format with a schema")
    # OpenAI names every schema; the name is not sent to an Anthropic upstream.
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": dict(schema)}}
