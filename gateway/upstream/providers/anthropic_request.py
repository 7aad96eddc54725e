"""OpenAI chat request -> Anthropic Messages request (the body, as a dict).

The two APIs say the same things in different places (Anthropic API
reference, "Messages"):
- system/developer messages become the top-level ``system`` string;
- content is a list of blocks; an assistant's ``tool_calls`` become
  ``tool_use`` blocks, and ``tool`` messages become ``tool_result`` blocks in
  a *user* turn, which is where Anthropic expects a tool's answer;
- consecutive messages of one role are merged into one turn (several tool
  results answering one assistant turn must travel together);
- ``max_tokens`` is required, so a default is filled in.

What cannot be said in the Messages API (audio, files, legacy ``function``
messages) is the client's mistake for this upstream: ``BadRequest``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import BadRequest

#: Anthropic requires max_tokens; OpenAI clients usually leave it out.
DEFAULT_MAX_TOKENS = 4096

Block = dict[str, Any]


def translate_chat(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The streaming Messages request body for a validated OpenAI chat request."""
    system, messages = _translate_messages(chat.get("messages") or [])
    body: dict[str, Any] = {"model": chat.get("model")}
    if system:
        body["system"] = system
    body["messages"] = messages
    body["max_tokens"] = (
        chat.get("max_completion_tokens") or chat.get("max_tokens") or DEFAULT_MAX_TOKENS
    )
    for name in ("temperature", "top_p"):
        if chat.get(name) is not None:
            body[name] = chat[name]
    stop = chat.get("stop")
    if isinstance(stop, str):
        body["stop_sequences"] = [stop]
    elif stop:
        body["stop_sequences"] = list(stop)
    if chat.get("tools"):
        body["tools"] = [_translate_tool(tool) for tool in chat["tools"]]
    tool_choice = _translate_tool_choice(chat.get("tool_choice"), chat.get("parallel_tool_calls"))
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if chat.get("user"):
        body["metadata"] = {"user_id": chat["user"]}
    body["stream"] = True
    return body


def _translate_messages(raw_messages: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    system_parts: list[str] = []
    turns: list[tuple[str, list[Block]]] = []
    for message in raw_messages:
        if not isinstance(message, Mapping):
            raise BadRequest("each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _plain_text(message.get("content"), role=role)
            if text:
                system_parts.append(text)
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
    return "\n\n".join(system_parts), messages


def _compact(blocks: list[Block]) -> str | list[Block]:
    """A lone text block is sent as a plain string, the API's short form."""
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        text: str = blocks[0]["text"]
        return text
    return blocks


def _content_blocks(content: Any) -> list[Block]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Block] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url") or {}))
        elif kind == "refusal":
            continue  # the assistant's earlier refusal carries no content to resend
        else:
            raise BadRequest(
                f"content parts of type {kind!r} cannot be sent to an Anthropic upstream"
            )
    return blocks


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


def _plain_text(content: Any, *, role: str) -> str:
    """System and tool content: a string, or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise BadRequest(f"{role} messages may only contain text for an Anthropic upstream")
        texts.append(part.get("text") or "")
    return "\n".join(texts)


def _tool_use_block(call: Mapping[str, Any]) -> Block:
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
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id"),
        "content": _plain_text(message.get("content"), role="tool"),
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
    return translated


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
