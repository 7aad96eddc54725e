"""Validating an OpenAI chat-completions request body.

Checks what a provider would reject anyway, but here, with a 400 the client
can read, before any upstream call, admission slot or coalescing happens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

_NUMBERS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_POSITIVE_INTS = ("max_tokens", "max_completion_tokens", "n")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    stream: bool
    include_usage: bool

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


class _NotAJsonNumber(ValueError):
    pass


def _no_constants(name: str) -> float:
    raise _NotAJsonNumber(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotAJsonNumber(f"{text} is out of range")
    return value


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        # NaN, Infinity and 1e999 are not JSON (RFC 8259 §6), though Python's
        # parser takes them: refused here, or they would reach the provider
        # as whatever the encoder makes of them (orjson writes null).
        body = json.loads(raw, parse_constant=_no_constants, parse_float=_finite)
    except _NotAJsonNumber as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _field("model", "must be a non-empty string")
    _check_messages(body.get("messages"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _field("stream", "must be a boolean")
    for name in _NUMBERS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _field(name, "must be a number")
    for name in _POSITIVE_INTS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _field(name, "must be a positive integer")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _field("stop", "must be a string or a list of strings")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise _field("tools", "must be a list of objects")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _field("stream_options", "must be an object")
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ChatRequest(body=body, stream=stream, include_usage=include_usage)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _field("messages", "must be a non-empty list")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _field(where, "must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise _field(f"{where}.role", "must be one of " + ", ".join(sorted(ROLES)))
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise _field(f"{where}.content", "is required")
        if not isinstance(content, str | list):
            raise _field(f"{where}.content", "must be a string or a list of content parts")


def _field(name: str, problem: str) -> BadRequest:
    return BadRequest(f"'{name}' {problem}", code="invalid_value")
