"""Validating an OpenAI chat-completions request body.

Checks what a provider would reject anyway, but here, with a 400 that names
the field, before any upstream call, admission slot or coalescing happens:
a malformed field must never come back as a 502 or an in-stream error after
the 200. The shapes are those of OpenAI's chat-completions reference; fields
this module does not know pass through unchecked (the key still hashes them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

#: Numbers and their ranges, as OpenAI's chat-completions reference gives them.
_NUMBERS = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "frequency_penalty": (-2, 2),
    "presence_penalty": (-2, 2),
}
_POSITIVE_INTS = ("max_tokens", "max_completion_tokens", "n")
_BOOLS = ("stream", "logprobs", "parallel_tool_calls", "store")
_STRINGS = ("user", "reasoning_effort", "service_tier")

#: Content part types and the member each must carry (its own name).
_PART_MEMBERS = {
    "text": "text",
    "image_url": "image_url",
    "input_audio": "input_audio",
    "file": "file",
    "refusal": "refusal",
}
_TOOL_CHOICE_WORDS = frozenset({"none", "auto", "required"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})

#: A JSON \u escape of a UTF-16 surrogate (U+D800..U+DFFF): only then can the
#: parsed body hold a lone one, and only then is the body walked for it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    return validate_chat_body(parse_json_object(raw))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, read strictly (UTF-8,
    JSON's numbers only, no lone surrogates); BadRequest says what is wrong."""
    try:
        # RFC 8259 §8.1: JSON between systems is UTF-8. Decoded strictly here:
        # json.loads(bytes) would guess UTF-16 and let encoded surrogates by.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"request body is not valid UTF-8 (at byte {exc.start})", code="invalid_encoding"
        ) from exc
    try:
        # NaN, Infinity and 1e999 are not JSON (RFC 8259 §6), though Python's
        # parser takes them: refused here, or they would reach the provider
        # as whatever the encoder makes of them (orjson writes null).
        body = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except _NotAJsonNumber as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise BadRequest("request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:
        # int() refuses a literal of more than sys.get_int_max_str_digits()
        # digits (4300): quadratic to convert, so a bound against denial of service.
        raise BadRequest(
            "request body holds an integer too long to read", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(body, "")
    return body


def validate_chat_body(body: dict[str, Any]) -> ChatRequest:
    """Every known field of a parsed body checked; raises BadRequest naming
    the first one that is wrong."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _field("model", "must be a non-empty string")
    _check_messages(body.get("messages"))
    for name in _BOOLS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _field(name, "must be a boolean")
    for name in _STRINGS:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise _field(name, "must be a string")
    for name, (low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is not None and not (_is_number(value) and low <= value <= high):
            raise _field(name, f"must be a number from {low} to {high}")
    for name in _POSITIVE_INTS:
        value = body.get(name)
        if value is not None and (not _is_int(value) or value < 1):
            raise _field(name, "must be a positive integer")
    if body.get("n") not in (None, 1):
        # One upstream stream is one choice: the coalesced fan-out relays
        # choice 0 only, so n > 1 would silently answer with one. (null is
        # the default, as OpenAI takes it: the SDK sends it for n=None.)
        raise BadRequest("'n' must be 1: this gateway returns one choice", code="unsupported_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _field("seed", "must be an integer")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20):
        raise _field("top_logprobs", "must be an integer from 0 to 20")
    if top_logprobs and body.get("logprobs") is not True:
        # OpenAI and vLLM refuse alternatives without the tokens' own logprobs.
        raise _field("top_logprobs", "needs 'logprobs': true")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _field("stop", "must be a string or a list of strings")
    _check_logit_bias(body.get("logit_bias"))
    _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"))
    if body.get("tools") is None and body.get("tool_choice") not in (None, "none"):
        # OpenAI and vLLM refuse a tool_choice with no tools ("none" only
        # OpenAI: vLLM answers it, as no tool call).
        raise _field("tool_choice", "is only allowed when 'tools' are specified")
    _check_response_format(body.get("response_format"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _field("stream_options", "must be an object")
    if isinstance(options, dict) and not isinstance(options.get("include_usage", False), bool):
        raise _field("stream_options.include_usage", "must be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _field("metadata", "must be an object")
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return ChatRequest(body=body, stream=bool(body.get("stream", False)), include_usage=include_usage)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise _field(f"{where}.name", "must be a string")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _field(f"{where}.tool_call_id", "is required for a tool message")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not calls:
                raise _field(f"{where}.tool_calls", "must be a non-empty list on an assistant message")
            for number, call in enumerate(calls):
                _check_tool_call(call, f"{where}.tool_calls[{number}]")
        function_call = message.get("function_call")
        if function_call is not None:
            if role != "assistant":
                raise _field(f"{where}.function_call", "is only for an assistant message")
            _check_function(function_call, f"{where}.function_call")
        content = message.get("content")
        if content is None:
            if role == "assistant" and (calls or function_call is not None):
                continue
            raise _field(f"{where}.content", "is required")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _field(f"{where}.content", "must be a string or a list of content parts")
        if not content:
            raise _field(f"{where}.content", "must not be an empty list")
        for number, part in enumerate(content):
            _check_part(part, f"{where}.content[{number}]")


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict):
        raise _field(where, "must be an object with a 'type'")
    kind = part.get("type")
    member = _PART_MEMBERS.get(kind) if isinstance(kind, str) else None
    if member is None:
        raise _field(f"{where}.type", "must be one of " + ", ".join(sorted(_PART_MEMBERS)))
    value = part.get(member)
    if kind in ("text", "refusal"):
        if not isinstance(value, str):
            raise _field(f"{where}.{member}", "must be a string")
        return
    if not isinstance(value, dict):
        raise _field(f"{where}.{member}", "must be an object")
    if kind == "image_url" and not isinstance(value.get("url"), str):
        raise _field(f"{where}.image_url.url", "must be a string")
    if kind == "input_audio":
        for key in ("data", "format"):
            if not isinstance(value.get(key), str):
                raise _field(f"{where}.input_audio.{key}", "must be a string")


def _check_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict):
        raise _field(where, "must be an object")
    if not isinstance(call.get("id"), str):
        # What the tool message's tool_call_id answers (required by OpenAI).
        raise _field(f"{where}.id", "must be a string")
    if call.get("type") == "custom":
        custom = call.get("custom")
        if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
            raise _field(f"{where}.custom.name", "must be a string")
        if not isinstance(custom.get("input", ""), str):
            raise _field(f"{where}.custom.input", "must be a string")
        return
    _check_function(call.get("function"), f"{where}.function")


def _check_function(function: Any, where: str) -> None:
    """A function call as a message carries it: a name, JSON arguments."""
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _field(f"{where}.name", "must be a string")
    if not isinstance(function.get("arguments", ""), str):
        raise _field(f"{where}.arguments", "must be a string (JSON text)")


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _field("tools", "must be a list of objects")
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise _field(where, "must be an object")
        if not isinstance(tool.get("type"), str):
            raise _field(f"{where}.type", "must be a string")
        if tool["type"] == "function":
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _field(f"{where}.function.name", "must be a string")
            parameters = function.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise _field(f"{where}.function.parameters", "must be an object (JSON Schema)")


def _check_tool_choice(choice: Any) -> None:
    if choice is None or (isinstance(choice, str) and choice in _TOOL_CHOICE_WORDS):
        return
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        if choice["type"] != "function":
            return
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return
        raise _field("tool_choice.function.name", "must be a string")
    raise _field("tool_choice", "must be 'none', 'auto', 'required' or an object naming a tool")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in _RESPONSE_FORMATS:
        raise _field(
            "response_format", "must be an object with type " + ", ".join(sorted(_RESPONSE_FORMATS))
        )
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _field("response_format.json_schema", "must be an object")
        if not isinstance(spec.get("name"), str):
            # Required by OpenAI's reference (and refused without by vLLM).
            raise _field("response_format.json_schema.name", "must be a string")


def _check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise _field("logit_bias", "must be an object of token ids to numbers")
    for token, value in bias.items():
        if not _is_number(value):
            raise _field(f"logit_bias.{token}", "must be a number")


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """A string that cannot be UTF-8 (a lone surrogate from a ``\\ud800``
    escape) cannot go upstream or into the key: 400, naming where it is."""
    if isinstance(value, str):
        if not _encodes(value):
            raise _field(where or "(body)", "contains a lone UTF-16 surrogate escape")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if not _encodes(key):
                raise _field(where or "(body)", "has a member name with a lone UTF-16 surrogate")
            _refuse_lone_surrogates(item, path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{index}]")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(name: str, problem: str) -> BadRequest:
    return BadRequest(f"'{name}' {problem}", code="invalid_value")
