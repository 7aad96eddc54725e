"""OpenAI chat request -> Anthropic Messages request (the body, as a dict).

The two APIs say the same things in different places (Anthropic API
reference, "Messages"):
- system/developer messages become the top-level ``system`` string;
- content is a list of blocks; an assistant's ``tool_calls`` become
  ``tool_use`` blocks, and ``tool`` messages become ``tool_result`` blocks in
  a *user* turn, which is where Anthropic expects a tool's answer;
- consecutive messages of one role are merged into one turn (several tool
  results answering one assistant turn must travel together);
- ``max_tokens`` is required, so a default is filled in;
- ``cache_control`` on a content part (and on a tool) is Anthropic's own
  prompt-caching mark ("Prompt caching"): it stays on the block it marks;
- ``response_format`` ``json_schema`` becomes ``output_config.format``
  ("Structured outputs"); ``text`` is the default and says nothing; a
  function's ``strict`` becomes its tool's ``strict`` ("Strict tool use").

What cannot be said in the Messages API (audio, files, legacy ``function``
messages, a seed, logprobs, penalties, ``json_object`` without a schema) is
the client's mistake for this upstream: ``BadRequest`` naming the field,
never a parameter dropped on the way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import BadRequest

#: Anthropic requires max_tokens; OpenAI clients usually leave it out.
DEFAULT_MAX_TOKENS = 4096

#: Request fields translated below, or with no meaning to the upstream's
#: answer (delivery, OpenAI-side storage): nothing of them is lost.
_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "stop", "tools", "tool_choice", "parallel_tool_calls", "user", "stream",
    "stream_options", "response_format", "n", "logprobs", "store", "metadata",
})  # fmt: skip

#: Fields the Messages API has no equivalent for, and why (the 400's words).
_UNTRANSLATABLE = {
    "seed": "Anthropic's Messages API has no seed: sampling cannot be made repeatable",
    "top_logprobs": "Anthropic's Messages API returns no log probabilities",
    "logit_bias": "Anthropic's Messages API has no logit bias",
    "frequency_penalty": "Anthropic's Messages API has no frequency penalty",
    "presence_penalty": "Anthropic's Messages API has no presence penalty",
    "audio": "Anthropic's Messages API produces no audio",
    "modalities": "Anthropic's Messages API answers in text only",
    "prediction": "Anthropic's Messages API has no predicted outputs",
    "reasoning_effort": "use an OpenAI-compatible upstream for reasoning_effort",
    "functions": "legacy functions cannot be sent to an Anthropic upstream; use tools",
    "function_call": "legacy function_call cannot be sent to an Anthropic upstream; use tool_choice",
}

Block = dict[str, Any]


def translate_chat(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The streaming Messages request body for a validated OpenAI chat request."""
    _refuse_untranslatable(chat)
    system, messages = _translate_messages(chat.get("messages") or [])
    if not messages:
        # The Messages API needs one besides the system prompt; OpenAI's
        # answers a system prompt alone.
        raise BadRequest(
            "'messages' must hold a user or assistant message with content for an Anthropic upstream",
            code="unsupported_value",
        )
    body: dict[str, Any] = {"model": chat.get("model")}
    if system:
        body["system"] = system
    body["messages"] = messages
    body["max_tokens"] = (
        chat.get("max_completion_tokens") or chat.get("max_tokens") or DEFAULT_MAX_TOKENS
    )
    for name in ("temperature", "top_p", "top_k"):
        if chat.get(name) is not None:
            body[name] = chat[name]
    stop = chat.get("stop")
    if isinstance(stop, str):
        body["stop_sequences"] = _stop_sequences([stop])
    elif stop:
        body["stop_sequences"] = _stop_sequences(stop)
    if chat.get("tools"):
        body["tools"] = [_translate_tool(tool) for tool in chat["tools"]]
    tool_choice = _translate_tool_choice(chat.get("tool_choice"), chat.get("parallel_tool_calls"))
    if tool_choice is not None and "tools" not in body:
        # Anthropic refuses a tool_choice without tools; "auto" and "none"
        # then mean what no tools means, and are left out.
        _refuse_a_required_call(tool_choice)
        tool_choice = None
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if chat.get("user"):
        body["metadata"] = {"user_id": chat["user"]}
    output_format = _translate_response_format(chat.get("response_format"))
    if output_format is not None:
        body["output_config"] = {"format": output_format}
    body["stream"] = True
    return body


def _refuse_untranslatable(chat: Mapping[str, Any]) -> None:
    """400 for a field the upstream would not get; absent, null and no-op
    values (a penalty of 0, ``logprobs: false``, ``n: 1``) are fine."""
    for name, value in chat.items():
        if value is None:
            continue
        if name in _UNTRANSLATABLE:
            if name.endswith("_penalty") and value == 0:
                continue
            if name == "modalities" and value == ["text"]:
                continue
            raise BadRequest(
                f"'{name}' cannot be sent to an Anthropic upstream: {_UNTRANSLATABLE[name]}",
                code="unsupported_parameter",
            )
        if name not in _TRANSLATED:
            raise BadRequest(
                f"'{name}' is not known to this gateway's Anthropic translation "
                "and would be dropped; leave it out",
                code="unsupported_parameter",
            )
    if chat.get("logprobs"):
        raise BadRequest(
            "'logprobs' cannot be sent to an Anthropic upstream: "
            "Anthropic's Messages API returns no log probabilities",
            code="unsupported_parameter",
        )
    temperature = chat.get("temperature")
    if temperature is not None and temperature > 1:
        # OpenAI's range is 0 to 2, Anthropic's 0 to 1 ("Messages"): the
        # upstream would refuse it, and only after the 200 on a stream.
        raise BadRequest(
            "'temperature' must be from 0 to 1 for an Anthropic upstream",
            code="unsupported_value",
        )
    top_k = chat.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        # Not an OpenAI field, so unchecked on the way in (vLLM takes -1).
        raise BadRequest(
            "'top_k' must be an integer from 0 for an Anthropic upstream", code="invalid_value"
        )
    n = chat.get("n")
    if n is not None and n != 1:
        raise BadRequest(
            "'n' must be 1 for an Anthropic upstream: it answers one choice",
            code="unsupported_parameter",
        )


def _translate_response_format(response_format: Any) -> Block | None:
    """OpenAI ``response_format`` -> Anthropic ``output_config.format``."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise BadRequest(
                "'response_format.json_schema.schema' must be an object", code="invalid_value"
            )
        return {"type": "json_schema", "schema": schema}
    if kind == "json_object":
        raise BadRequest(
            "'response_format' of type 'json_object' cannot be sent to an Anthropic upstream: "
            "its structured outputs need a schema; use type 'json_schema'",
            code="unsupported_parameter",
        )
    raise BadRequest(
        "'response_format.type' must be 'text', 'json_schema' or 'json_object'",
        code="invalid_value",
    )

def _translate_messages(
    raw_messages: list[Any],
) -> tuple[str | list[Block], list[dict[str, Any]]]:
    system_messages: list[list[Block]] = []
    turns: list[tuple[str, list[Block]]] = []
    for message in raw_messages:
        if not isinstance(message, Mapping):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            if blocks := _text_blocks(message.get("content"), role=role):
                system_messages.append(blocks)
            continue
        if role == "user":
            turn_role, blocks = "user", _content_blocks(message.get("content"))
        elif role == "assistant":
            turn_role = "assistant"
            blocks = _content_blocks(message.get("content"))
            blocks += [_tool_use_block(call) for call in message.get("tool_calls") or ()]
        elif role == "tool":
            turn_role, blocks = "user", [_tool_result_block(message)]
        else:
            raise BadRequest(f"messages with role {role!r} cannot be sent to an Anthropic upstream")
        if not blocks:
            continue  # an empty message says nothing, and Anthropic rejects empty text
        if turns and turns[-1][0] == turn_role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((turn_role, blocks))
    messages = [{"role": role, "content": _compact(blocks)} for role, blocks in turns]
    system: str | list[Block]
    if any("cache_control" in block for blocks in system_messages for block in blocks):
        # Blocks, so the cache breakpoint stays where the client put it.
        system = [block for blocks in system_messages for block in blocks]
    else:
        system = "\n\n".join(
            "\n".join(block["text"] for block in blocks) for blocks in system_messages
        )
    return system, messages


def _compact(blocks: list[Block]) -> str | list[Block]:
    """A lone text block is sent as a plain string, the API's short form
    (unless it carries a cache mark, which only a block can)."""
    if len(blocks) == 1 and blocks[0]["type"] == "text" and "cache_control" not in blocks[0]:
        text: str = blocks[0]["text"]
        return text
    return blocks


def _cache_control(part: Mapping[str, Any], block: Block) -> Block:
    """Keep a content part's ``cache_control`` on the block made from it."""
    mark = part.get("cache_control")
    if mark is not None:
        if not isinstance(mark, Mapping):
            raise BadRequest("'cache_control' must be an object", code="invalid_value")
        block["cache_control"] = dict(mark)
    return block


def _content_blocks(content: Any) -> list[Block]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if _has_text(content) else []
    blocks: list[Block] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if _has_text(part.get("text")):
                blocks.append(_cache_control(part, {"type": "text", "text": part["text"]}))
        elif kind == "image_url":
            blocks.append(_cache_control(part, _image_block(part.get("image_url") or {})))
        elif kind == "refusal":
            continue  # the assistant's earlier refusal carries no content to resend
        else:
            raise BadRequest(
                f"content parts of type {kind!r} cannot be sent to an Anthropic upstream"
            )
    return blocks


def _has_text(text: Any) -> bool:
    """Whether a text says anything: Anthropic refuses a text block that is
    empty or whitespace only, and such a block says nothing, so it is left out."""
    return isinstance(text, str) and bool(text.strip())


def _image_block(image_url: Mapping[str, Any]) -> Block:
    url = str(image_url.get("url") or "")
    if url.startswith("data:"):
        # data:<media type>;base64,<data> (RFC 2397)
        header, _, data = url[len("data:") :].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64" or not data:
            raise BadRequest("image data URLs must be base64-encoded")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _text_blocks(content: Any, *, role: str) -> list[Block]:
    """System and tool content: text blocks, cache marks kept."""
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if _has_text(content) else []
    blocks = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise BadRequest(f"{role} messages may only contain text for an Anthropic upstream")
        if _has_text(part.get("text")):
            blocks.append(_cache_control(part, {"type": "text", "text": part["text"]}))
    return blocks


def _tool_use_block(call: Mapping[str, Any]) -> Block:
    if call.get("type") == "custom":
        # Free text as its input: a tool_use block takes a JSON object.
        raise BadRequest(
            "custom tool calls cannot be sent to an Anthropic upstream",
            code="unsupported_parameter",
        )
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = json.loads(arguments)
    except ValueError as exc:
        raise BadRequest("tool_calls[].function.arguments must be a JSON object") from exc
    if not isinstance(tool_input, dict):
        raise BadRequest("tool_calls[].function.arguments must be a JSON object")
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": tool_input,
    }


def _tool_result_block(message: Mapping[str, Any]) -> Block:
    blocks = _text_blocks(message.get("content"), role="tool")
    content: str | list[Block]
    if any("cache_control" in block for block in blocks):
        content = blocks
    else:
        content = "\n".join(block["text"] for block in blocks)
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id"),
        "content": content,
    }


def _translate_tool(tool: Mapping[str, Any]) -> Block:
    if tool.get("type") != "function":
        raise BadRequest("only tools of type 'function' can be sent to an Anthropic upstream")
    function = tool.get("function") or {}
    translated: Block = {"name": function.get("name")}
    if function.get("description"):
        translated["description"] = function["description"]
    # Anthropic requires a schema; a function without parameters takes none.
    translated["input_schema"] = function.get("parameters") or {
        "type": "object",
        "properties": {},
    }
    # Strict tool use, the same switch on both sides: the input must match the
    # schema (Anthropic's tools[].strict, "Strict tool use"; no beta header).
    strict = function.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise BadRequest("tools[].function.strict must be a boolean")
        translated["strict"] = strict
    # A cache breakpoint after the tool definitions, where clients put one.
    return _cache_control(tool, translated)


def _stop_sequences(stop: list[str]) -> list[str]:
    """Anthropic refuses a stop sequence of whitespace only, or empty:
    refused here, before the 200, rather than dropped (the answer would go
    on past the stop the client asked for)."""
    if not all(sequence.strip() for sequence in stop):
        raise BadRequest(
            "'stop' sequences must have a character other than whitespace for an Anthropic upstream",
            code="unsupported_value",
        )
    return list(stop)


def _refuse_a_required_call(tool_choice: Block) -> None:
    """With no tools, a call that must be made ("any", a named tool) cannot be."""
    if tool_choice["type"] not in ("auto", "none"):
        raise BadRequest("'tool_choice' needs tools for an Anthropic upstream", code="invalid_value")


def _translate_tool_choice(choice: Any, parallel_tool_calls: Any) -> Block | None:
    translated: Block | None
    if choice is None:
        translated = None
    elif choice == "auto":
        translated = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        translated = {"type": "none"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        translated = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    else:
        raise BadRequest("tool_choice must be 'auto', 'required', 'none' or a function")
    if parallel_tool_calls is False and (translated is None or translated["type"] != "none"):
        # OpenAI's switch lives inside tool_choice on Anthropic's side.
        translated = dict(translated or {"type": "auto"})
        translated["disable_parallel_tool_use"] = True
    return translated
