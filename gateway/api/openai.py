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

from actors.deltas import Delta, ToolCallDelta, Usage
from actors.subscription import Subscription
from gateway.api.chat_request import ChatRequest
from gateway.api.intake import read_chat, subscribe
from gateway.api.relay import SharedFrames, note_queue_wait, relay
from gateway.errors import GatewayError
from gateway.sse import DONE, comment_frame, data_frame, dumps
from gateway.state import RECORD

API = "openai"


def _tool_call(call: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": call.index}
    if call.id is not None:
        out["id"] = call.id
        out["type"] = "function"
    function: dict[str, str] = {"arguments": call.arguments}
    if call.name is not None:
        function["name"] = call.name
    out["function"] = function
    return out


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ChunkEncoder:
    """``data: {chat.completion.chunk}`` frames for one subscriber; the
    frames of the stream's deltas are shared with its other subscribers."""

    __slots__ = ("_shared", "_base", "_include_usage")

    def __init__(self, subscription: Subscription, *, model: str, include_usage: bool):
        self._shared = SharedFrames(subscription, API)
        self._base = {
            "id": completion_id(subscription),
            "object": "chat.completion.chunk",
            # The stream's, not this request's: shared frames must be identical.
            "created": subscription.created,
            "model": model,
        }
        self._include_usage = include_usage

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return data_frame({**self._base, "choices": [choice]})

    def meta(self, subscription: Subscription, ttft_ms: float, queue_wait_ms: float) -> bytes:
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
        if delta.tool_calls:
            body["tool_calls"] = [_tool_call(call) for call in delta.tool_calls]
        if body or delta.finish_reason:
            return self._chunk(body, delta.finish_reason)
        return b""

    def end(self, subscription: Subscription, ttft_ms: float | None, total_ms: float) -> bytes:
        if subscription.outcome == "cancelled":
            return self._chunk({}, "cancelled") + DONE
        return DONE

    def error(self, exc: GatewayError) -> bytes:
        # No [DONE] after it: the OpenAI SDK raises on an error object.
        return data_frame(exc.to_json())


def completion_id(subscription: Subscription) -> str:
    return f"chatcmpl-{subscription.key[:16]}{subscription.stream_id}"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    record = request[RECORD]
    record.api = API
    chat = await read_chat(request)
    subscription = await subscribe(request, chat, streaming=chat.stream)
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
    deltas: list[Delta] = []
    async with subscription:
        try:
            while batch := await subscription.read_batch():
                deltas.extend(batch)
        finally:
            note_queue_wait(request, subscription)
    if subscription.outcome == "cancelled":
        record.outcome = "cancelled"
    response = web.json_response(_completion(subscription, chat, deltas), dumps=dumps)
    record.bytes_sent = len(response.body) if isinstance(response.body, bytes) else 0
    return response


def _completion(subscription: Subscription, chat: ChatRequest, deltas: list[Delta]) -> dict[str, Any]:
    text = "".join(d.text for d in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    finish_reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None)
    usage = next((d.usage for d in reversed(deltas) if d.usage is not None), None)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for call in delta.tool_calls:
            merged = calls.setdefault(
                call.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.id is not None:
                merged["id"] = call.id
            if call.name is not None:
                merged["function"]["name"] += call.name
            merged["function"]["arguments"] += call.arguments
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
    if subscription.outcome == "cancelled":
        finish_reason = "cancelled"
    body: dict[str, Any] = {
        "id": completion_id(subscription),
        "object": "chat.completion",
        "created": subscription.created,
        "model": chat.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason or "stop"}],
    }
    if usage is not None:
        body["usage"] = _usage(usage)
    return body
