"""The two provider wire formats: parsing their requests, encoding their answers.

OpenAI chat completions (``data: {chunk}`` frames ending in ``data: [DONE]``)
and Anthropic messages (``event: X`` / ``data: {...}`` pairs), byte for byte
in the providers' compact JSON, non-ASCII text as raw UTF-8 as the providers
send it. Frames are ``\\n\\n``-separated SSE events (WHATWG HTML §9.2).

Token frames are the hot path (tens of thousands a second in benchmarks): each
encoder renders its per-request envelope once into a prefix and a suffix, and
a token frame is ``prefix + json(token) + suffix``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Format = Literal["openai", "anthropic"]
FinishReason = Literal["stop", "length"]

DEFAULT_MODEL = "sim-1"


class InvalidRequest(ValueError):
    """The body is not a request of the provider's API (answered with 400)."""


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    format: Format
    messages: list[dict[str, Any]]
    stream: bool
    model: str
    #: The request's cap on output tokens, if any.
    max_tokens: int | None
    #: OpenAI ``stream_options.include_usage``: a usage chunk before [DONE].
    include_usage: bool = False


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest("each message must be an object with a string 'role'")
    return messages


def _optional(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name, default)
    if value is not None and not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' must be of type {kind.__name__}")
    return value


def _optional_count(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    # bool is an int in Python: refuse it where a count is expected.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"'{name}' must be an integer >= 1")
    return value


def parse_openai(body: bytes) -> CompletionRequest:
    data = _load_object(body)
    stream_options = _optional(data, "stream_options", dict, None) or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest("'stream_options.include_usage' must be a boolean")
    max_tokens = _optional_count(data, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _optional_count(data, "max_tokens")
    return CompletionRequest(
        format="openai",
        messages=_messages(data),
        stream=_optional(data, "stream", bool, False),
        model=_optional(data, "model", str, DEFAULT_MODEL),
        max_tokens=max_tokens,
        include_usage=include_usage,
    )


def parse_anthropic(body: bytes) -> CompletionRequest:
    data = _load_object(body)
    if "max_tokens" not in data:
        raise InvalidRequest("'max_tokens' is required")
    return CompletionRequest(
        format="anthropic",
        messages=_messages(data),
        stream=_optional(data, "stream", bool, False),
        model=_optional(data, "model", str, DEFAULT_MODEL),
        max_tokens=_optional_count(data, "max_tokens"),
    )


@dataclass(frozen=True, slots=True)
class AnswerExtras:
    """What an answer may carry besides its text, as a real upstream's does
    (set per request by sim knobs): tests check that a gateway relays them."""

    #: The model named in the answer (a real upstream resolves an alias to a
    #: dated name); None: the requested one.
    resolved_model: str | None = None
    #: OpenAI's ``system_fingerprint`` in every chunk; None: not sent.
    fingerprint: str | None = None
    #: Per-token ``logprobs`` (OpenAI format).
    logprobs: bool = False
    #: The answer is a refusal (OpenAI ``refusal`` deltas; Anthropic
    #: stop_reason ``refusal``).
    refusal: bool = False
    #: Usage details: prompt tokens read from a cache, completion tokens
    #: spent reasoning (OpenAI details; Anthropic ``cache_read_input_tokens``).
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


def token_logprob(token: str) -> dict[str, Any]:
    """A made-up but deterministic log probability entry for one token."""
    return {
        "token": token,
        "logprob": -round(len(token) / 64, 6),
        "bytes": list(token.encode()),
        "top_logprobs": [],
    }


# -- encoding ---------------------------------------------------------------------

_SLOT = "\x00token\x00"
_SLOT_JSON = json.dumps(_SLOT)


def _template(frame_start: str, envelope: dict[str, Any]) -> tuple[bytes, bytes]:
    """Split a frame around the JSON string that stands for the token."""
    head, found, tail = (frame_start + _dumps(envelope) + "\n\n").partition(_SLOT_JSON)
    assert found, "the envelope must hold the token slot"
    return head.encode(), tail.encode()


@functools.lru_cache(maxsize=4096)
def _short_json_string(text: str) -> bytes:
    return _dumps(text).encode()


def _json_string(text: str) -> bytes:
    # Natural words repeat, so their encodings are cached; big sized tokens
    # are not, or the cache would pin megabytes.
    return _short_json_string(text) if len(text) <= 32 else _dumps(text).encode()


class WireEncoder(Protocol):
    """One response's frames in one provider's format."""

    def stream_open(self) -> bytes:
        """What precedes the first token (role chunk / message_start...)."""
        ...

    def token(self, text: str) -> bytes: ...

    def stream_close(self, finish: FinishReason, completion_tokens: int) -> bytes: ...

    def malformed(self) -> bytes:
        """A data line that is not valid JSON, where a token would be."""
        ...

    def message(self, tokens: Sequence[str], finish: FinishReason, completion_tokens: int) -> bytes:
        """The whole answer as one non-streaming JSON body."""
        ...


class OpenAIEncoder:
    def __init__(
        self,
        response_id: str,
        model: str,
        created: int,
        prompt_tokens: int,
        include_usage: bool,
        extras: AnswerExtras = AnswerExtras(),
    ) -> None:
        self._envelope: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": extras.resolved_model or model,
        }
        if extras.fingerprint is not None:
            self._envelope["system_fingerprint"] = extras.fingerprint
        self._prompt_tokens = prompt_tokens
        self._include_usage = include_usage
        self._extras = extras
        #: Where a token goes: OpenAI streams a refusal in its own field.
        self._field = "refusal" if extras.refusal else "content"
        self._token_head, self._token_tail = _template(
            "data: ", self._chunk({self._field: _SLOT})
        )

    def _chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope, "choices": [choice]}

    def _logprobs(self, tokens: Sequence[str]) -> dict[str, Any] | None:
        if not self._extras.logprobs:
            return None
        entries = [token_logprob(token) for token in tokens]
        if self._extras.refusal:
            return {"content": None, "refusal": entries}
        return {"content": entries, "refusal": None}

    def _usage(self, completion_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self._prompt_tokens + completion_tokens,
        }
        if self._extras.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self._extras.cached_tokens}
        if self._extras.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {
                "reasoning_tokens": self._extras.reasoning_tokens
            }
        return usage

    def stream_open(self) -> bytes:
        return f"data: {_dumps(self._chunk({'role': 'assistant', 'content': ''}))}\n\n".encode()

    def token(self, text: str) -> bytes:
        if self._extras.logprobs:
            chunk = self._chunk({self._field: text}, logprobs=self._logprobs([text]))
            return f"data: {_dumps(chunk)}\n\n".encode()
        return self._token_head + _json_string(text) + self._token_tail

    def stream_close(self, finish: FinishReason, completion_tokens: int) -> bytes:
        frames = [_dumps(self._chunk({}, finish))]
        if self._include_usage:
            usage_chunk = {**self._envelope, "choices": [], "usage": self._usage(completion_tokens)}
            frames.append(_dumps(usage_chunk))
        frames.append("[DONE]")
        return "".join(f"data: {frame}\n\n" for frame in frames).encode()

    def malformed(self) -> bytes:
        return b'data: {"malformed\n\n'

    def message(self, tokens: Sequence[str], finish: FinishReason, completion_tokens: int) -> bytes:
        text = "".join(tokens)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self._extras.refusal:
            message.update(content=None, refusal=text)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(tokens),
            "finish_reason": finish,
        }
        body = {
            **self._envelope,
            "object": "chat.completion",
            "choices": [choice],
            "usage": self._usage(completion_tokens),
        }
        return _dumps(body).encode()


_ANTHROPIC_STOP: dict[FinishReason, str] = {"stop": "end_turn", "length": "max_tokens"}


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {_dumps(data)}\n\n"


class AnthropicEncoder:
    def __init__(
        self,
        response_id: str,
        model: str,
        prompt_tokens: int,
        extras: AnswerExtras = AnswerExtras(),
    ) -> None:
        self._response_id = response_id
        self._model = extras.resolved_model or model
        self._prompt_tokens = prompt_tokens
        self._extras = extras
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _SLOT}}
        self._token_head, self._token_tail = _template("event: content_block_delta\ndata: ", delta)

    def _message(self, content: list[dict[str, str]], stop: str | None, output: int) -> dict[str, Any]:
        return {
            "id": self._response_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": self._usage(output),
        }

    def _usage(self, output: int) -> dict[str, int]:
        usage = {"input_tokens": self._prompt_tokens, "output_tokens": output}
        if self._extras.cached_tokens is not None:
            # Anthropic's input_tokens leave out the tokens read from the cache.
            usage["input_tokens"] = max(self._prompt_tokens - self._extras.cached_tokens, 0)
            usage["cache_read_input_tokens"] = self._extras.cached_tokens
        return usage

    def _stop(self, finish: FinishReason) -> str:
        return "refusal" if self._extras.refusal else _ANTHROPIC_STOP[finish]

    def stream_open(self) -> bytes:
        return (
            _event("message_start", {"type": "message_start", "message": self._message([], None, 0)})
            + _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + _event("ping", {"type": "ping"})
        ).encode()

    def token(self, text: str) -> bytes:
        return self._token_head + _json_string(text) + self._token_tail

    def stream_close(self, finish: FinishReason, completion_tokens: int) -> bytes:
        stop = {"stop_reason": self._stop(finish), "stop_sequence": None}
        return (
            _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event(
                "message_delta",
                {"type": "message_delta", "delta": stop, "usage": {"output_tokens": completion_tokens}},
            )
            + _event("message_stop", {"type": "message_stop"})
        ).encode()

    def malformed(self) -> bytes:
        return b'event: content_block_delta\ndata: {"malformed\n\n'

    def message(self, tokens: Sequence[str], finish: FinishReason, completion_tokens: int) -> bytes:
        content = [{"type": "text", "text": "".join(tokens)}]
        return _dumps(self._message(content, self._stop(finish), completion_tokens)).encode()


def make_encoder(
    request: CompletionRequest,
    *,
    request_id: int,
    created: int,
    prompt_tokens: int,
    extras: AnswerExtras = AnswerExtras(),
) -> WireEncoder:
    if request.format == "anthropic":
        return AnthropicEncoder(f"msg_sim{request_id:012d}", request.model, prompt_tokens, extras)
    return OpenAIEncoder(
        f"chatcmpl-sim{request_id}",
        request.model,
        created,
        prompt_tokens,
        request.include_usage,
        extras,
    )


# -- errors -------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout_error", "timeout"),
    413: ("invalid_request_error", "payload_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}

_ANTHROPIC_ERRORS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(format: Format, status: int, message: str) -> bytes:
    """An error in the provider's shape: OpenAI ``{"error": {message, type,
    code}}``, Anthropic ``{"type": "error", "error": {type, message}}``."""
    if format == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return _dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    # OpenAI leaves the code null on its 5xx answers.
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _OPENAI_ERRORS.get(status, default)
    return _dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
