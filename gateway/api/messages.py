"""POST /v1/messages: Anthropic's Messages API, on the same actors.

The body is read as the OpenAI chat request it means (messages_request.py),
so it shares the prompt key, the upstream call and the replay with
``/v1/chat/completions``. The answer is encoded back into Anthropic's shape
(API reference, "Messages" and "Streaming Messages"): streaming, the events
``message_start``, then per content block ``content_block_start`` /
``content_block_delta``... / ``content_block_stop``, then ``message_delta``
(stop reason, usage) and ``message_stop``; an ``error`` event in place of the
rest after a failure. Errors before the 200 are Anthropic-shaped too
(``{"type": "error", "error": {"type", "message"}}``, the middleware).

Content blocks follow the answer: a change of kind (thinking, text, a tool
call) closes the open block and opens the next, numbered from 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any

from aiohttp import web

from actors.deltas import Delta, Usage
from actors.subscription import Subscription
from gateway.api.answer_id import answer_id
from gateway.api.intake import read_body, subscribe
from gateway.api.messages_request import parse_messages_request
from gateway.api.relay import SharedFrames, gather, relay
from gateway.errors import GatewayError
from gateway.sse import comment_frame, dumps, event_frame
from gateway.state import RECORD

API = "anthropic"

#: OpenAI finish_reason -> Anthropic stop_reason. ``cancelled`` is the
#: gateway's own (an explicit cancel), as on the other APIs.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
    "cancelled": "cancelled",
}

#: A block: its kind ("thinking", "text", "tool_use") and, for a tool call,
#: the call's index in the answer.
Block = tuple[str, int | None]


def message_id(subscription: Subscription) -> str:
    return answer_id("msg_", subscription)


def _stop_fields(
    finish_reason: str | None, stop_sequence: str | None, *, refused: bool
) -> dict[str, str | None]:
    """``stop_reason`` and ``stop_sequence``: the sequence that ended the
    answer, when the upstream named one.

    OpenAI streams a refusal in ``delta.refusal`` and ends it as any answer,
    with ``stop``; Anthropic says ``refusal`` in the stop reason. An answer
    that ended normally after refusal text (``refused``) is a refusal."""
    if refused and finish_reason in (None, "stop"):
        return {"stop_reason": "refusal", "stop_sequence": None}
    if stop_sequence is not None and finish_reason in (None, "stop"):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_sequence}
    return {"stop_reason": STOP_REASONS.get(finish_reason or "stop", "end_turn"), "stop_sequence": None}


def _usage(usage: Usage | None) -> dict[str, int]:
    """Anthropic's counts: its input_tokens leave out what was read from and
    written to the cache, which it reports apart."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached, written = usage.cached_tokens, usage.cache_write_tokens
    out = {
        "input_tokens": usage.prompt_tokens - (cached or 0) - (written or 0),
        "output_tokens": usage.completion_tokens,
    }
    if written is not None:
        out["cache_creation_input_tokens"] = written
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    return out


def _pieces(delta: Delta) -> list[tuple[Block, str]]:
    """A delta's content in answer order, each piece with the block it goes to."""
    pieces: list[tuple[Block, str]] = []
    if delta.reasoning:
        pieces.append((("thinking", None), delta.reasoning))
    # A refusal is text on Anthropic's side; the stop reason says "refusal".
    if delta.refusal:
        pieces.append((("text", None), delta.refusal))
    if delta.text:
        pieces.append((("text", None), delta.text))
    for call in delta.tool_calls:
        pieces.append((("tool_use", call.index), call.arguments))
    return pieces


def _block_start(block: Block, delta: Delta) -> dict[str, Any]:
    kind, index = block
    if kind == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    if kind == "text":
        return {"type": "text", "text": ""}
    call = next(c for c in delta.tool_calls if c.index == index)
    return {"type": "tool_use", "id": call.id or f"toolu_{index}", "name": call.name or "",
            "input": {}}


def _block_delta(block: Block, text: str) -> dict[str, str]:
    kind = block[0]
    if kind == "thinking":
        return {"type": "thinking_delta", "thinking": text}
    if kind == "text":
        return {"type": "text_delta", "text": text}
    return {"type": "input_json_delta", "partial_json": text}


class MessageEncoder:
    """Anthropic stream events for one subscriber. Block numbering is a
    function of the deltas from the first, which every subscriber reads (no
    resume on this API), so the frames of a delta are shared as on the
    OpenAI API."""

    __slots__ = (
        "_shared", "_subscription", "_model", "_open", "_next_index", "_started",
        "_finish_reason", "_stop_sequence", "_usage", "_refused",
    )  # fmt: skip

    def __init__(self, subscription: Subscription, *, model: str) -> None:
        self._shared = SharedFrames(subscription, API)
        self._subscription = subscription
        self._model = model
        self._open: Block | None = None
        self._next_index = 0
        self._started = False
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None
        self._usage: Usage | None = None
        self._refused = False

    def _message_start(self) -> bytes:
        self._started = True
        info = self._subscription.info
        message: dict[str, Any] = {
            "id": message_id(self._subscription),
            "type": "message",
            "role": "assistant",
            "model": (info.model if info else None) or self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Known at the end (message_delta) whatever the upstream.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return event_frame("message_start", {"type": "message_start", "message": message})

    def meta(self, subscription: Subscription, ttft_ms: float, queue_wait_ms: float) -> bytes:
        meta = {
            "request_id": subscription.request_id,
            "role": subscription.role,
            "queue_wait_ms": queue_wait_ms,
            "ttft_ms": ttft_ms,
        }
        # A comment (SDKs skip it), then the message the blocks belong to.
        return comment_frame("meta " + dumps(meta)) + self._message_start()

    def deltas(self, first_seq: int, deltas: Sequence[Delta]) -> bytes:
        frames = []
        for seq, delta in enumerate(deltas, start=first_seq):
            if delta.finish_reason:
                self._finish_reason = delta.finish_reason
                self._stop_sequence = delta.stop_sequence
            if delta.usage is not None:
                self._usage = delta.usage
            if delta.refusal:
                self._refused = True
            pieces = _pieces(delta)
            if not pieces:
                continue
            encode = partial(self._encode, self._open, self._next_index)
            frames.append(self._shared.frame(seq, delta, encode))
            # Advance this subscriber's block state as the frame did.
            for block, _ in pieces:
                if block != self._open:
                    self._open, self._next_index = block, self._next_index + 1
        return b"".join(frames)

    def _encode(self, opened: Block | None, next_index: int, seq: int, delta: Delta) -> bytes:
        """The events of one delta, from the block state before it."""
        frames = []
        for block, text in _pieces(delta):
            if block != opened:
                if opened is not None:
                    frames.append(_stop(next_index - 1))
                frames.append(event_frame("content_block_start", {
                    "type": "content_block_start", "index": next_index,
                    "content_block": _block_start(block, delta),
                }))  # fmt: skip
                opened, next_index = block, next_index + 1
            if text:
                frames.append(event_frame("content_block_delta", {
                    "type": "content_block_delta", "index": next_index - 1,
                    "delta": _block_delta(block, text),
                }))  # fmt: skip
        return b"".join(frames)

    def end(self, subscription: Subscription, ttft_ms: float | None, total_ms: float) -> bytes:
        frames = [] if self._started else [self._message_start()]
        if self._open is not None:
            frames.append(_stop(self._next_index - 1))
            self._open = None
        finish = "cancelled" if subscription.outcome == "cancelled" else self._finish_reason
        frames.append(event_frame("message_delta", {
            "type": "message_delta",
            "delta": _stop_fields(
                finish,
                None if finish == "cancelled" else self._stop_sequence,
                refused=self._refused,
            ),
            "usage": _usage(self._usage),
        }))  # fmt: skip
        frames.append(event_frame("message_stop", {"type": "message_stop"}))
        return b"".join(frames)

    def error(self, exc: GatewayError) -> bytes:
        # The Anthropic SDK raises on an error event.
        return event_frame("error", exc.to_anthropic_json())


def _stop(index: int) -> bytes:
    return event_frame("content_block_stop", {"type": "content_block_stop", "index": index})


async def messages(request: web.Request) -> web.StreamResponse:
    record = request[RECORD]
    chat = parse_messages_request(await read_body(request))
    # Frames carry no ids on this API and block numbers depend on every
    # delta from the first: a resumed reader would number them wrongly.
    subscription = await subscribe(request, chat, streaming=chat.stream, resumable=False)
    if chat.stream:
        encoder = MessageEncoder(subscription, model=chat.model)
        del chat
        return await relay(request, subscription, encoder)
    deltas = await gather(request, subscription)
    response = web.json_response(_message(subscription, chat.model, deltas), dumps=dumps)
    record.bytes_sent = len(response.body) if isinstance(response.body, bytes) else 0
    return response


def _message(subscription: Subscription, model: str, deltas: list[Delta]) -> dict[str, Any]:
    """``stream: false``: the whole message, its blocks merged as streamed."""
    content: list[dict[str, Any]] = []
    arguments: dict[int, str] = {}
    opened: Block | None = None
    for delta in deltas:
        for block, text in _pieces(delta):
            if block != opened:
                content.append(_block_start(block, delta))
                opened = block
            current = content[-1]
            if block[0] == "thinking":
                current["thinking"] += text
            elif block[0] == "text":
                current["text"] += text
            else:
                arguments[len(content) - 1] = arguments.get(len(content) - 1, "") + text
    for position, raw in arguments.items():
        try:
            content[position]["input"] = json.loads(raw) if raw else {}
        except ValueError:
            # Arguments cut short (max_tokens): kept as text, not lost.
            content[position]["input"] = {"_raw_arguments": raw}
    ending = next((d for d in reversed(deltas) if d.finish_reason), None)
    finish, stop_sequence = (None, None) if ending is None else (ending.finish_reason, ending.stop_sequence)
    if subscription.outcome == "cancelled":
        finish, stop_sequence = "cancelled", None
    usage = next((d.usage for d in reversed(deltas) if d.usage is not None), None)
    info = subscription.info
    return {
        "id": message_id(subscription),
        "type": "message",
        "role": "assistant",
        "model": (info.model if info else None) or model,
        "content": content,
        **_stop_fields(finish, stop_sequence, refused=any(d.refusal for d in deltas)),
        "usage": _usage(usage),
    }
