"""OpenAI-compatible chat completions: OpenAI, vLLM, llama.cpp, Ollama, TGI.

The client already speaks this dialect, so the request passes through almost
untouched; only streaming is forced on, with the usage chunk requested
(``stream_options.include_usage``), because one upstream stream feeds both
streaming and non-streaming clients and both want the token counts.

Stream format (OpenAI API reference, "The chat completion chunk object"):
``data: {chat.completion.chunk}`` events, a final chunk with empty
``choices`` and the ``usage``, then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actors.deltas import (
    CUSTOM,
    FUNCTION,
    FUNCTION_CALL,
    Delta,
    Logprobs,
    StreamInfo,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from gateway.errors import UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.base import Headers, ResponseHead, UpstreamRequest
from gateway.upstream.providers import wire
from gateway.upstream.providers.base import EventStreamDecoder, request_head
from gateway.upstream.sse_decoder import SSEEvent

_DONE = "[DONE]"
_HEADERS: Headers = (("content-type", "application/json"), ("accept", "text/event-stream"))
#: An in-stream error carries no HTTP status of its own; treat it as the
#: provider's server failing (our 502), unless the error names a status.
_IN_STREAM_ERROR_STATUS = 500


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._max_event_bytes = max_event_bytes

    def build_request(
        self, chat: Mapping[str, Any], *, base_path: str, api_key: str | None
    ) -> UpstreamRequest:
        body = dict(chat)
        body["stream"] = True
        client_options = chat.get("stream_options")
        options = dict(client_options) if isinstance(client_options, Mapping) else {}
        options["include_usage"] = True
        body["stream_options"] = options
        auth = ("authorization", f"Bearer {api_key}") if api_key else None
        path, headers = request_head(base_path, "/chat/completions", _HEADERS, auth)
        return UpstreamRequest(method="POST", path=path, headers=headers, body=wire.encode_json(body))

    def decoder(self) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder(max_event_bytes=self._max_event_bytes)

    def error_from_response(self, head: ResponseHead, body: bytes) -> UpstreamStatusError:
        body = wire.readable_body(head, body)
        payload = wire.parse_error_body(body)
        message, code, _ = _describe_error(payload) if payload is not None else (None, None, None)
        return wire.status_error(head, body, message, code)


class OpenAIStreamDecoder(EventStreamDecoder):
    __slots__ = ("_info_seen",)
    terminator = "data: [DONE]"
    # llama.cpp's server reports a failure mid-stream as an `error:` line.
    error_lines = True

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        super().__init__(max_event_bytes=max_event_bytes)
        # Every chunk repeats the model and fingerprint; the first says it.
        self._info_seen = False

    def handle_event(self, event: SSEEvent) -> Delta | None:
        data = event.data
        if event.event == "error":
            # Chunks come as unnamed events: one named "error" is the
            # upstream failing, whatever its data holds (an object or text).
            raise _error_event(data)
        if data == _DONE:
            self.finish()
            return None
        if not data.strip():
            return None  # an empty keepalive event carries nothing
        chunk = wire.parse_object(data, what="a chat.completion.chunk")
        if _is_error(chunk):
            raise _in_stream_error(chunk)
        if not self._info_seen and (info := _stream_info(chunk)) is not None:
            self._info_seen = True
            self.announce(info)
        return _delta_from_chunk(chunk)


def _is_error(chunk: wire.JsonObject) -> bool:
    """An error object where a chunk belongs: ``{"error": ...}``, or the flat
    ``{"object": "error", "message", "code"}`` that vLLM writes mid-stream
    (and follows with ``[DONE]``, which must not complete the answer)."""
    return chunk.get("error") is not None or chunk.get("object") == "error"


def _in_stream_error(payload: wire.JsonObject, text: str | None = None) -> UpstreamStatusError:
    """The upstream's error mid-stream, as an error status: ``text`` is its
    message when the error object has none."""
    message, code, status = _describe_error(payload)
    return UpstreamStatusError(
        status or _IN_STREAM_ERROR_STATUS,
        message or text or "upstream reported an error mid-stream",
        code=code,
    )


def _error_event(data: str) -> UpstreamStatusError:
    """An ``error`` event: its data an error object in any shape
    ``_describe_error`` reads, or the message as text."""
    payload = wire.parse_error_body(data.encode())
    if payload is not None:
        return _in_stream_error(payload)
    return _in_stream_error({}, data.strip()[: wire.MAX_ERROR_TEXT])


def _stream_info(chunk: wire.JsonObject) -> StreamInfo | None:
    model = wire.get_str(chunk, "model") or None
    fingerprint = wire.get_str(chunk, "system_fingerprint") or None
    if model is None and fingerprint is None:
        return None
    return StreamInfo(model=model, system_fingerprint=fingerprint)


#: The fields of the common chunk's ``delta``: one piece of text (the first
#: chunk also says the role).
_TEXT_ONLY = frozenset({"content", "role"})


def _delta_from_chunk(chunk: wire.JsonObject) -> Delta | None:
    choice = _first_choice(chunk)
    if choice is not None and choice.get("finish_reason") is None and "usage" not in chunk:
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.keys() <= _TEXT_ONLY and choice.get("logprobs") is None:
            # Nearly every chunk: text and nothing else, so only that is read.
            text = wire.get_str(delta, "content")
            return Delta(text=text) if text else None
    return _full_delta(chunk, choice)


def _full_delta(chunk: wire.JsonObject, choice: wire.JsonObject | None) -> Delta | None:
    text = reasoning = refusal = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str | None = None
    logprobs: Logprobs | None = None
    if choice is not None:
        finish_reason = wire.get_str(choice, "finish_reason") or None
        delta = wire.get_object(choice, "delta")
        if delta is not None:
            text = wire.get_str(delta, "content") or ""
            # DeepSeek and vLLM say reasoning_content; OpenRouter and Ollama, reasoning.
            reasoning = (
                wire.get_str(delta, "reasoning_content") or wire.get_str(delta, "reasoning") or ""
            )
            refusal = wire.get_str(delta, "refusal") or ""
            tool_calls = _tool_call_deltas(delta) or _function_call_delta(delta)
        logprobs = _logprobs(choice)
    usage = _usage(chunk)
    if not (
        text or reasoning or refusal or tool_calls or finish_reason or usage is not None
        or logprobs is not None
    ):
        return None  # role-only or empty chunk
    return Delta(
        text=text,
        reasoning=reasoning,
        tool_calls=tool_calls,
        usage=usage,
        finish_reason=finish_reason,
        refusal=refusal,
        logprobs=logprobs,
    )


def _logprobs(choice: wire.JsonObject) -> Logprobs | None:
    """``choice.logprobs`` ("The chat completion chunk object"): per-token
    entries of the content and of the refusal; None when absent or empty."""
    raw = wire.get_object(choice, "logprobs")
    if raw is None:
        return None
    content = _token_logprobs(raw, "content")
    refusal = _token_logprobs(raw, "refusal")
    if not (content or refusal):
        return None
    return Logprobs(content=content, refusal=refusal)


def _token_logprobs(raw: wire.JsonObject, key: str) -> tuple[TokenLogprob, ...]:
    entries = []
    for entry in wire.get_list(raw, key) or ():
        if not isinstance(entry, dict):
            raise UpstreamProtocolError(f"upstream logprobs.{key} entry is not an object")
        top = []
        for alternative in wire.get_list(entry, "top_logprobs") or ():
            if not isinstance(alternative, dict):
                raise UpstreamProtocolError("upstream top_logprobs entry is not an object")
            top.append(
                TopLogprob(
                    token=wire.get_str(alternative, "token") or "",
                    logprob=_number(alternative, "logprob"),
                    bytes=_bytes(alternative),
                )
            )
        entries.append(
            TokenLogprob(
                token=wire.get_str(entry, "token") or "",
                logprob=_number(entry, "logprob"),
                bytes=_bytes(entry),
                top_logprobs=tuple(top),
            )
        )
    return tuple(entries)


def _number(obj: wire.JsonObject, key: str) -> float:
    value = obj.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise UpstreamProtocolError(f"upstream field {key!r} is not a number")


def _bytes(obj: wire.JsonObject) -> tuple[int, ...] | None:
    raw = wire.get_list(obj, "bytes")
    if raw is None:
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in raw):
        raise UpstreamProtocolError("upstream field 'bytes' is not a list of integers")
    return tuple(raw)


def _first_choice(chunk: wire.JsonObject) -> wire.JsonObject | None:
    """The choice with index 0: a ``Delta`` is one answer, so with ``n > 1``
    the other choices' chunks have nowhere to go."""
    for choice in wire.get_list(chunk, "choices") or ():
        if not isinstance(choice, dict):
            raise UpstreamProtocolError("upstream chunk choice is not an object")
        if (wire.get_int(choice, "index") or 0) == 0:
            return choice
    return None


def _tool_call_deltas(delta: wire.JsonObject) -> tuple[ToolCallDelta, ...]:
    calls = wire.get_list(delta, "tool_calls")
    if not calls:
        return ()
    fragments = []
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            raise UpstreamProtocolError("upstream tool call is not an object")
        index = wire.get_int(call, "index")
        # A custom tool's call carries free text as its input; a function's,
        # JSON arguments.
        custom = wire.get_object(call, CUSTOM)
        if custom is not None or wire.get_str(call, "type") == CUSTOM:
            kind, body, field = CUSTOM, custom or {}, "input"
        else:
            kind, body, field = FUNCTION, wire.get_object(call, "function") or {}, "arguments"
        fragments.append(
            ToolCallDelta(
                index=position if index is None else index,
                id=wire.get_str(call, "id"),
                name=wire.get_str(body, "name"),
                arguments=wire.get_str(body, field) or "",
                kind=kind,
            )
        )
    return tuple(fragments)


def _function_call_delta(delta: wire.JsonObject) -> tuple[ToolCallDelta, ...]:
    """The legacy ``function_call`` (requests with ``functions``): one call."""
    call = wire.get_object(delta, "function_call")
    if call is None:
        return ()
    return (ToolCallDelta(
        index=0,
        name=wire.get_str(call, "name"),
        arguments=wire.get_str(call, "arguments") or "",
        kind=FUNCTION_CALL,
    ),)  # fmt: skip


def _usage(chunk: wire.JsonObject) -> Usage | None:
    usage = wire.get_object(chunk, "usage")
    if usage is None:
        return None
    prompt_details = wire.get_object(usage, "prompt_tokens_details") or {}
    completion_details = wire.get_object(usage, "completion_tokens_details") or {}
    return Usage(
        prompt_tokens=wire.get_int(usage, "prompt_tokens") or 0,
        completion_tokens=wire.get_int(usage, "completion_tokens") or 0,
        cached_tokens=wire.get_int(prompt_details, "cached_tokens"),
        reasoning_tokens=wire.get_int(completion_details, "reasoning_tokens"),
    )


def _describe_error(payload: wire.JsonObject) -> tuple[str | None, str | None, int | None]:
    """(message, code, status) from ``{"error": {...}}`` in any of the shapes
    OpenAI-compatible servers use: OpenAI's object with a string ``code``,
    vLLM's with the numeric status as ``code``, a bare ``{"error": "text"}``,
    or a flat ``{"object": "error", "message": ...}``."""
    error = payload.get("error")
    if isinstance(error, str):
        return error, None, None
    if not isinstance(error, dict):
        error = payload
    message = error.get("message")
    raw_code = error.get("code")
    status: int | None = None
    code: str | None = None
    if isinstance(raw_code, int) and not isinstance(raw_code, bool):
        status = raw_code if 400 <= raw_code <= 599 else None
    elif isinstance(raw_code, str) and raw_code:
        code = raw_code
    return (message if isinstance(message, str) and message else None), code, status
