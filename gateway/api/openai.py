"""POST /v1/chat/completions: the OpenAI-compatible API.

Whatever the upstream's format, clients get OpenAI ``chat.completion.chunk``
frames (or one ``chat.completion`` when ``stream`` is false). Frames carry the
stream's id, model and creation time, so every subscriber of one upstream
stream receives the same completion, byte for byte after the meta comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from actors.deltas import (
    CUSTOM,
    FUNCTION_CALL,
    Delta,
    Logprobs,
    StreamInfo,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from actors.subscription import Subscription
from gateway.api.answer_id import answer_id
from gateway.api.chat_request import ChatRequest
from gateway.api.intake import read_chat, subscribe
from gateway.api.relay import SharedFrames, gather, relay
from gateway.errors import GatewayError
from gateway.sse import DONE, comment_frame, data_frame, dumps
from gateway.state import RECORD

API = "openai"


def _tool_call(call: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": call.index}
    if call.id is not None:
        out["id"] = call.id
        out["type"] = call.kind
    out[call.kind] = _call_body(call)
    return out


def _argument_field(kind: str) -> str:
    """Where a call's ``arguments`` go: a custom tool's call names it its input."""
    return "input" if kind == CUSTOM else "arguments"


def _call_body(call: ToolCallDelta) -> dict[str, str]:
    """A fragment's ``function`` (``function_call``) or ``custom`` member."""
    body = {_argument_field(call.kind): call.arguments}
    if call.name is not None:
        body["name"] = call.name
    return body


def _usage(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    # The details only when the upstream reported them: a 0 made up here
    # would claim "no cache hit" where the truth is "not said".
    if usage.cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def _token_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": None if entry.bytes is None else list(entry.bytes),
            "top_logprobs": [
                {
                    "token": top.token,
                    "logprob": top.logprob,
                    "bytes": None if top.bytes is None else list(top.bytes),
                }
                for top in entry.top_logprobs
            ],
        }
        for entry in entries
    ]


def _logprobs(content: Sequence[TokenLogprob], refusal: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choice.logprobs`` as OpenAI shapes it: each list, or null when empty."""
    return {
        "content": _token_logprobs(content) if content else None,
        "refusal": _token_logprobs(refusal) if refusal else None,
    }


def _envelope(info: StreamInfo | None, model: str) -> dict[str, Any]:
    """The model the upstream says served the answer (``gpt-x`` resolves to
    ``gpt-x-2025-01-01``), else the one asked for; its fingerprint if told."""
    out: dict[str, Any] = {"model": (info.model if info else None) or model}
    if info is not None and info.system_fingerprint is not None:
        out["system_fingerprint"] = info.system_fingerprint
    return out


class ChunkEncoder:
    """``data: {chat.completion.chunk}`` frames for one subscriber; the
    frames of the stream's deltas are shared with its other subscribers."""

    __slots__ = ("_shared", "_base", "_include_usage", "_subscription", "_resolved")

    def __init__(self, subscription: Subscription, *, model: str, include_usage: bool):
        self._shared = SharedFrames(subscription, API)
        self._subscription = subscription
        self._base: dict[str, Any] = {
            "id": completion_id(subscription),
            "object": "chat.completion.chunk",
            # The stream's, not this request's: shared frames must be identical.
            "created": subscription.created,
            "model": model,
        }
        # Until the upstream has named its model, frames carry the asked-for one.
        self._resolved = False
        self._include_usage = include_usage

    def _resolve(self) -> None:
        info = self._subscription.info
        if info is not None:
            self._base.update(_envelope(info, self._base["model"]))
            self._resolved = True

    def _chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: Logprobs | None = None,
    ) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        if logprobs is not None:
            choice["logprobs"] = _logprobs(logprobs.content, logprobs.refusal)
        choice["finish_reason"] = finish_reason
        return data_frame({**self._base, "choices": [choice]})

    def meta(self, subscription: Subscription, ttft_ms: float, queue_wait_ms: float) -> bytes:
        if not self._resolved:
            self._resolve()
        meta = {
            "request_id": subscription.request_id,
            "role": subscription.role,
            "queue_wait_ms": queue_wait_ms,
            "ttft_ms": ttft_ms,
        }
        # The comment first (SDKs skip it), then the role chunk OpenAI sends
        # before any content.
        return comment_frame("meta " + dumps(meta)) + self._chunk(
            {"role": "assistant", "content": ""}
        )

    def deltas(self, first_seq: int, deltas: Sequence[Delta]) -> bytes:
        if not self._resolved:
            self._resolve()
        frames = []
        for seq, delta in enumerate(deltas, start=first_seq):
            frames.append(self._shared.frame(seq, delta, self._encode))
            if delta.usage is not None and self._include_usage:
                frames.append(data_frame({**self._base, "choices": [], "usage": _usage(delta.usage)}))
        return b"".join(frames)

    def _encode(self, seq: int, delta: Delta) -> bytes:
        body: dict[str, Any] = {}
        if delta.text:
            body["content"] = delta.text
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.refusal:
            body["refusal"] = delta.refusal
        if delta.tool_calls:
            if delta.tool_calls[0].kind == FUNCTION_CALL:
                body["function_call"] = _call_body(delta.tool_calls[0])
            else:
                body["tool_calls"] = [_tool_call(call) for call in delta.tool_calls]
        if body or delta.finish_reason or delta.logprobs is not None:
            return self._chunk(body, delta.finish_reason, delta.logprobs)
        return b""

    def end(self, subscription: Subscription, ttft_ms: float | None, total_ms: float) -> bytes:
        if subscription.outcome == "cancelled":
            return self._chunk({}, "cancelled") + DONE
        return DONE

    def error(self, exc: GatewayError) -> bytes:
        # No [DONE] after it: the OpenAI SDK raises on an error object.
        return data_frame(exc.to_json())


def completion_id(subscription: Subscription) -> str:
    return answer_id("chatcmpl-", subscription)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = await read_chat(request)
    # No frame of this API carries an event id (nor is there one frame per
    # delta of the log), so a Last-Event-ID names no point of this answer:
    # honoured, it would cut its head off. Resuming is /v1/stream's.
    subscription = await subscribe(request, chat, streaming=chat.stream, resumable=False)
    if chat.stream:
        encoder = ChunkEncoder(subscription, model=chat.model, include_usage=chat.include_usage)
        # The parsed prompt (a whole chat history, often) is not needed while
        # the answer streams: an open stream should not hold a copy of it.
        del chat
        return await relay(request, subscription, encoder)
    return await _complete(request, chat, subscription)


async def _complete(
    request: web.Request, chat: ChatRequest, subscription: Subscription
) -> web.Response:
    """``stream: false``: the same shared upstream stream, gathered."""
    record = request[RECORD]
    deltas = await gather(request, subscription)
    response = web.json_response(_completion(subscription, chat, deltas), dumps=dumps)
    record.bytes_sent = len(response.body) if isinstance(response.body, bytes) else 0
    return response


def _completion(subscription: Subscription, chat: ChatRequest, deltas: list[Delta]) -> dict[str, Any]:
    text = "".join(d.text for d in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    refusal = "".join(d.refusal for d in deltas)
    content_logprobs = [e for d in deltas if d.logprobs for e in d.logprobs.content]
    refusal_logprobs = [e for d in deltas if d.logprobs for e in d.logprobs.refusal]
    finish_reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)
    usage = next((d.usage for d in reversed(deltas) if d.usage is not None), None)
    calls: dict[int, dict[str, Any]] = {}
    function_call: dict[str, str] | None = None
    for delta in deltas:
        for call in delta.tool_calls:
            if call.kind == FUNCTION_CALL:
                function_call = function_call or {"name": "", "arguments": ""}
                function_call["name"] += call.name or ""
                function_call["arguments"] += call.arguments
                continue
            field = _argument_field(call.kind)
            merged = calls.setdefault(
                call.index, {"id": None, "type": call.kind, call.kind: {"name": "", field: ""}}
            )
            if call.id is not None:
                merged["id"] = call.id
            if call.name is not None:
                merged[call.kind]["name"] += call.name
            merged[call.kind][field] += call.arguments
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not (calls or function_call or refusal) else None,
    }
    if function_call is not None:
        message["function_call"] = function_call
    if reasoning:
        message["reasoning_content"] = reasoning
    if refusal:
        message["refusal"] = refusal
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    if subscription.outcome == "cancelled":
        finish_reason = "cancelled"
    choice: dict[str, Any] = {"index": 0, "message": message}
    if content_logprobs or refusal_logprobs:
        choice["logprobs"] = _logprobs(content_logprobs, refusal_logprobs)
    choice["finish_reason"] = finish_reason or "stop"
    body: dict[str, Any] = {
        "id": completion_id(subscription),
        "object": "chat.completion",
        "created": subscription.created,
        **_envelope(subscription.info, chat.model),
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = _usage(usage)
    return body
