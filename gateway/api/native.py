"""POST /v1/stream: the native event stream, for the browser client.

``event: meta`` at the first token, ``event: delta`` with ``id: <seq>`` (the
position in the stream's log, so ``Last-Event-ID`` resumes exactly after it),
``event: done`` with the totals, or ``event: error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from actors.deltas import Delta, Usage
from actors.subscription import Subscription
from gateway.api.intake import KEY_PREFIX, read_chat, subscribe
from gateway.api.relay import SharedFrames, relay
from gateway.errors import GatewayError
from gateway.sse import event_frame

API = "native"


class NativeEncoder:
    __slots__ = ("_shared", "_finish_reason", "_usage")

    def __init__(self, subscription: Subscription) -> None:
        self._shared = SharedFrames(subscription, API)
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def meta(self, subscription: Subscription, ttft_ms: float, queue_wait_ms: float) -> bytes:
        return event_frame(
            "meta",
            {
                "request_id": subscription.request_id,
                "role": subscription.role,
                "queue_wait_ms": queue_wait_ms,
                "ttft_ms": ttft_ms,
                "key": subscription.key[:KEY_PREFIX],
                "subscribers": subscription.subscribers,
            },
        )

    def deltas(self, first_seq: int, deltas: Sequence[Delta]) -> bytes:
        frames = []
        for seq, delta in enumerate(deltas, start=first_seq):
            if delta.finish_reason:
                self._finish_reason = delta.finish_reason
            if delta.usage is not None:
                self._usage = delta.usage
            if delta.is_content:
                frames.append(self._shared.frame(seq, delta, _delta_frame))
        return b"".join(frames)

    def end(self, subscription: Subscription, ttft_ms: float | None, total_ms: float) -> bytes:
        finish_reason = (
            "cancelled" if subscription.outcome == "cancelled" else self._finish_reason or "stop"
        )
        usage = None
        if self._usage is not None:
            usage = {
                "prompt_tokens": self._usage.prompt_tokens,
                "completion_tokens": self._usage.completion_tokens,
                "total_tokens": self._usage.total_tokens,
            }
        return event_frame(
            "done",
            {"finish_reason": finish_reason, "usage": usage, "ttft_ms": ttft_ms, "total_ms": total_ms},
        )

    def error(self, exc: GatewayError) -> bytes:
        return event_frame(
            "error", {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
        )


def _delta_frame(seq: int, delta: Delta) -> bytes:
    body: dict[str, Any] = {}
    if delta.text:
        body["text"] = delta.text
    if delta.reasoning:
        body["reasoning"] = delta.reasoning
    if delta.refusal:
        body["refusal"] = delta.refusal
    if delta.tool_calls:
        body["tool_calls"] = [
            {"index": c.index, "id": c.id, "name": c.name, "arguments": c.arguments, "type": c.kind}
            for c in delta.tool_calls
        ]
    return event_frame("delta", body, event_id=seq)


async def stream(request: web.Request) -> web.StreamResponse:
    subscription = await subscribe(request, await read_chat(request), streaming=True)
    # The parsed prompt is gone by now: an open stream holds no copy of it.
    return await relay(request, subscription, NativeEncoder(subscription))
