"""Anthropic Messages API: request translation out, stream events in.

Stream format (Anthropic API reference, "Streaming Messages"): named SSE
events ``message_start``, then per content block ``content_block_start`` /
``content_block_delta``... / ``content_block_stop``, then ``message_delta``
(stop reason, cumulative usage) and ``message_stop``; ``ping`` any time;
``error`` in place of the rest. Unknown event types must be tolerated (the
docs promise new ones), so they are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from actors.deltas import Delta, StreamInfo, ToolCallDelta, Usage
from gateway.errors import UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.base import Headers, ResponseHead, UpstreamRequest
from gateway.upstream.providers import wire
from gateway.upstream.providers.anthropic_request import translate_chat
from gateway.upstream.providers.base import EventStreamDecoder, request_head
from gateway.upstream.sse_decoder import SSEEvent

API_VERSION = "2023-06-01"
_HEADERS: Headers = (
    ("content-type", "application/json"),
    ("accept", "text/event-stream"),
    ("anthropic-version", API_VERSION),
)

#: Anthropic stop_reason -> OpenAI finish_reason. The answer was cut short
#: both at max_tokens and when it filled the model's context window
#: (model_context_window_exceeded; "Handling stop reasons" in the docs).
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: Anthropic error type -> the HTTP status it comes with ("Errors" in the docs).
#: 529 (overloaded) is Anthropic's own; as any 5xx it becomes our retryable 502.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_KNOWN_EVENTS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "error",
    }
)


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._max_event_bytes = max_event_bytes

    def build_request(
        self, chat: Mapping[str, Any], *, base_path: str, api_key: str | None
    ) -> UpstreamRequest:
        auth = ("x-api-key", api_key) if api_key else None
        path, headers = request_head(base_path, "/messages", _HEADERS, auth)
        return UpstreamRequest(
            method="POST", path=path, headers=headers, body=wire.encode_json(translate_chat(chat))
        )

    def decoder(self) -> AnthropicStreamDecoder:
        return AnthropicStreamDecoder(max_event_bytes=self._max_event_bytes)

    def error_from_response(self, head: ResponseHead, body: bytes) -> UpstreamStatusError:
        body = wire.readable_body(head, body)
        payload = wire.parse_error_body(body)
        message, error_type = _describe_error(payload) if payload is not None else (None, None)
        return wire.status_error(head, body, message, error_type)


class AnthropicStreamDecoder(EventStreamDecoder):
    __slots__ = (
        "_input_tokens", "_completion_tokens", "_cached_tokens", "_cache_write_tokens",
        "_tool_ordinals", "_unsent_inputs",
    )  # fmt: skip
    terminator = "message_stop"

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        super().__init__(max_event_bytes=max_event_bytes)
        self._input_tokens = 0
        self._completion_tokens = 0
        self._cached_tokens: int | None = None
        self._cache_write_tokens: int | None = None
        # Content block index -> tool-call ordinal: OpenAI numbers tool calls
        # 0, 1, 2..., Anthropic numbers all blocks (text, thinking, tool_use).
        self._tool_ordinals: dict[int, int] = {}
        # Tool block index -> its start block's input as JSON, until the block
        # streams argument bytes of its own.
        self._unsent_inputs: dict[int, str] = {}

    def handle_event(self, event: SSEEvent) -> Delta | None:
        kind = event.event
        if kind not in _KNOWN_EVENTS and kind != "message":
            return None  # ping, and whatever comes next
        payload = wire.parse_object(event.data, what=f"an Anthropic {kind} event")
        if kind == "message":  # no `event:` line: the payload names its type
            kind = wire.get_str(payload, "type") or ""
        if kind == "content_block_delta":
            return self._on_block_delta(payload)
        if kind == "content_block_start":
            return self._on_block_start(payload)
        if kind == "content_block_stop":
            return self._on_block_stop(payload)
        if kind == "message_start":
            self._on_message_start(payload)
        elif kind == "message_delta":
            return self._on_message_delta(payload)
        elif kind == "message_stop":
            self.finish()
        elif kind == "error":
            raise _in_stream_error(payload)
        return None

    def _on_message_start(self, payload: wire.JsonObject) -> None:
        message = wire.get_object(payload, "message") or {}
        usage = wire.get_object(message, "usage")
        if usage is not None:
            self._take_usage(usage)
        # The model that serves the answer (an alias resolves to a dated name).
        if model := wire.get_str(message, "model"):
            self.announce(StreamInfo(model=model))

    def _on_block_start(self, payload: wire.JsonObject) -> Delta | None:
        index = _block_index(payload)
        block = wire.get_object(payload, "content_block") or {}
        kind = wire.get_str(block, "type")
        if kind == "tool_use":
            ordinal = len(self._tool_ordinals)
            self._tool_ordinals[index] = ordinal
            tool_input = block.get("input")
            self._unsent_inputs[index] = json.dumps(
                tool_input if isinstance(tool_input, dict) else {},
                separators=(",", ":"),
                ensure_ascii=False,
            )
            call = ToolCallDelta(
                index=ordinal, id=wire.get_str(block, "id"), name=wire.get_str(block, "name")
            )
            return Delta(tool_calls=(call,))
        # A block may open with content of its own (usually empty).
        if kind == "text" and (text := wire.get_str(block, "text")):
            return Delta(text=text)
        if kind == "thinking" and (thinking := wire.get_str(block, "thinking")):
            return Delta(reasoning=thinking)
        return None

    def _on_block_delta(self, payload: wire.JsonObject) -> Delta | None:
        delta = wire.get_object(payload, "delta") or {}
        kind = wire.get_str(delta, "type")
        if kind == "text_delta":
            text = wire.get_str(delta, "text")
            return Delta(text=text) if text else None
        if kind == "thinking_delta":
            thinking = wire.get_str(delta, "thinking")
            return Delta(reasoning=thinking) if thinking else None
        if kind == "input_json_delta":
            index = _block_index(payload)
            ordinal = self._tool_ordinals.get(index)
            if ordinal is None:
                raise UpstreamProtocolError(
                    f"upstream sent tool input for content block {index}, not a tool_use block"
                )
            partial = wire.get_str(delta, "partial_json")
            if not partial:
                return None  # Anthropic often opens with an empty fragment
            self._unsent_inputs.pop(index, None)
            return Delta(tool_calls=(ToolCallDelta(index=ordinal, arguments=partial),))
        return None  # signature_delta, citations_delta: nothing a client shows

    def _on_block_stop(self, payload: wire.JsonObject) -> Delta | None:
        """A tool block that streamed no argument bytes gets its start block's
        input as arguments. A tool without parameters streams only an empty
        input_json_delta (Anthropic API reference, "Streaming Messages"; its
        input is ``{}``): OpenAI clients must still get JSON, not ``""``."""
        index = _block_index(payload)
        unsent = self._unsent_inputs.pop(index, None)
        if unsent is None:
            return None
        return Delta(tool_calls=(ToolCallDelta(index=self._tool_ordinals[index], arguments=unsent),))

    def _on_message_delta(self, payload: wire.JsonObject) -> Delta:
        delta = wire.get_object(payload, "delta") or {}
        stop_reason = wire.get_str(delta, "stop_reason")
        usage = wire.get_object(payload, "usage")
        if usage is not None:
            self._take_usage(usage)
        return Delta(
            finish_reason=STOP_REASONS.get(stop_reason, "stop") if stop_reason else None,
            stop_sequence=wire.get_str(delta, "stop_sequence") if stop_reason == "stop_sequence" else None,
            usage=Usage(
                prompt_tokens=(
                    self._input_tokens + (self._cache_write_tokens or 0) + (self._cached_tokens or 0)
                ),
                completion_tokens=self._completion_tokens,
                cached_tokens=self._cached_tokens,
                cache_write_tokens=self._cache_write_tokens,
            ),
        )

    def _take_usage(self, usage: wire.JsonObject) -> None:
        """Counts are cumulative; message_delta repeats only some of them, so
        each is kept as last given and the prompt count is summed at the end.

        OpenAI's prompt_tokens include cached tokens, Anthropic's input_tokens
        do not: the cache reads and writes are added back in."""
        input_tokens = wire.get_int(usage, "input_tokens")
        cache_read = wire.get_int(usage, "cache_read_input_tokens")
        if cache_read is not None:
            # OpenAI's prompt_tokens_details.cached_tokens: read from the cache.
            self._cached_tokens = cache_read
        cache_write = wire.get_int(usage, "cache_creation_input_tokens")
        if cache_write is not None:
            self._cache_write_tokens = cache_write
        if input_tokens is not None:
            self._input_tokens = input_tokens
        output_tokens = wire.get_int(usage, "output_tokens")
        if output_tokens is not None:
            self._completion_tokens = output_tokens


def _block_index(payload: wire.JsonObject) -> int:
    index = wire.get_int(payload, "index")
    if index is None:
        raise UpstreamProtocolError("upstream content block event has no index")
    return index


def _describe_error(payload: wire.JsonObject) -> tuple[str | None, str | None]:
    """(message, type) from ``{"type": "error", "error": {"type", "message"}}``."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return None, None
    message = error.get("message")
    error_type = error.get("type")
    return (
        message if isinstance(message, str) and message else None,
        error_type if isinstance(error_type, str) and error_type else None,
    )


def _in_stream_error(payload: wire.JsonObject) -> UpstreamStatusError:
    message, error_type = _describe_error(payload)
    # An error event replaces a response that already said 200: its type is
    # the only hint of the status it would have had.
    status = ERROR_STATUS.get(error_type or "", 500)
    return UpstreamStatusError(
        status, message or "upstream reported an error mid-stream", code=error_type
    )
