"""From a subscription to the client: SSE frames out (``relay``), or the
whole answer gathered for a non-streaming response (``gather``).

The order on the wire is fixed by the API contract: headers and ``: ping`` at
once; the meta record right before the first content; content frames; the
API's end (``[DONE]`` / ``event: done``), or its in-stream error once the 200
has gone out. Leaving -- a client disconnect cancels the handler, with
``handler_cancellation=True`` -- closes the subscription on the way out,
which resets the upstream in the same tick if this was the last subscriber.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import structlog
from aiohttp import web

from actors.deltas import Delta
from actors.messages import SlowReader
from actors.subscription import Subscription
from gateway.connection import client_connection
from gateway.errors import GatewayError, ReaderTooSlow, for_client
from gateway.metrics import outcome_of
from gateway.sse import PING, close_event_stream, open_event_stream
from gateway.state import RECORD, STATE, RequestRecord

log = structlog.get_logger("gateway")

#: Deltas written at once, at most: what a reader takes is what it writes,
#: so a slow one lags in the stream's shared log, where the lag bound
#: (STREAM_MAX_LAG_BYTES / _S) sees it, not in its transport's buffer.
MAX_BATCH = 256


class StreamEncoder(Protocol):
    """One API's frames, as bytes (no I/O: the relay writes them)."""

    def meta(self, subscription: Subscription, ttft_ms: float, queue_wait_ms: float) -> bytes: ...

    def deltas(self, first_seq: int, deltas: Sequence[Delta]) -> bytes: ...

    def end(self, subscription: Subscription, ttft_ms: float | None, total_ms: float) -> bytes: ...

    def error(self, exc: GatewayError) -> bytes: ...


class SharedFrames:
    """The frames of one stream's deltas, encoded once for all its
    subscribers: the fan-out writes the same bytes to each instead of
    encoding every delta again per subscriber. A stream read by one client
    keeps nothing (there is no one to share with)."""

    __slots__ = ("_api", "_subscription")

    def __init__(self, subscription: Subscription, api: str) -> None:
        self._subscription = subscription
        self._api = api

    def frame(self, seq: int, delta: Delta, encode: Callable[[int, Delta], bytes]) -> bytes:
        if self._subscription.subscribers <= 1:
            return encode(seq, delta)
        memo = self._subscription.memo
        table = memo.get(self._api)
        if table is None:
            table = memo[self._api] = {}
        frame = table.get(seq)
        if frame is None:
            frame = table[seq] = encode(seq, delta)
        return cast(bytes, frame)


async def relay(request: web.Request, subscription: Subscription, encoder: StreamEncoder) -> (
    web.StreamResponse
):
    """Relay the stream. One coroutine, the loop included: each parked stream
    holds this frame and its callers' while it waits (a helper coroutine for
    the loop would be ~300 bytes more per idle stream)."""
    state = request.app[STATE]
    record = request[RECORD]
    ttft_ms: float | None = None
    last_frame: bytes | None = None
    #: Frames taken once the stream had ended: they go out with the last frame.
    tail = b""
    async with subscription:
        # One yield first: the actor task (just started) sends the upstream
        # request before this handler spends its time on the response head
        # and the ping. The first byte leaves ~0.1 ms later, the upstream
        # request ~0.5 ms sooner on a gateway woken from idle, and TTFT is
        # what that buys.
        await asyncio.sleep(0)
        response = await open_event_stream(request, keepalive=state.keepalive)
        record.bytes_sent += len(PING)
        connection = client_connection(request)
        if connection is not None:
            # A client that half-closes is told apart from one that left by
            # pings (gateway/connection.py).
            connection.probe_with(response.ping)
        state.active_streams += 1
        try:
            while True:
                batch = subscription.take_batch(MAX_BATCH)
                if batch is None:
                    # The actor's future, awaited here and not through
                    # read_batch(): a coroutine less per batch and per
                    # parked stream.
                    await subscription.readable()
                    continue
                if not batch:
                    break
                first_seq = subscription.cursor - len(batch) + 1
                frames = encoder.deltas(first_seq, batch)
                # The first token, or an answer's end with none (an empty
                # answer still opens with its role).
                if ttft_ms is None and any(d.is_content or d.finish_reason for d in batch):
                    ttft_ms = _first_token(request, subscription)
                    queue_wait_ms = note_queue_wait(request, subscription) or 0.0
                    # Tokens flow: the fast pings that show a gone client
                    # while the first token is awaited are no longer needed.
                    state.keepalive.answered(response)
                    frames = encoder.meta(subscription, ttft_ms, queue_wait_ms) + frames
                if subscription.at_end:
                    # The end is logged too (an answer's last chunks and its
                    # end arrive together): these frames leave with the last
                    # one, in one write.
                    tail = frames
                    continue
                await response.write(_counted(record, frames))
                # A parked stream holds no written bytes.
                del frames
            if subscription.outcome == "cancelled":
                record.outcome = "cancelled"
            total_ms = round((time.monotonic() - record.arrived_at) * 1000, 2)
            last_frame = tail + encoder.end(subscription, ttft_ms, total_ms)
        except GatewayError as exc:
            record.outcome = outcome_of(exc.status, exc.code)
            record.error_code = exc.code
            # The deltas logged before the failure, then the failure.
            last_frame = tail + encoder.error(for_client(exc))
        except SlowReader as exc:
            lagged = ReaderTooSlow(str(exc))
            # The client's doing, like a disconnect: not an error of ours.
            record.outcome, record.error_code = "cancelled", lagged.code
            log.info("slow reader ended", reason=str(exc))
            last_frame = tail + encoder.error(lagged)
        except ConnectionResetError:
            # The client went away between two writes: a cancel, not an error.
            record.outcome = "cancelled"
        except Exception as exc:  # a bug, not an upstream failure: say so in-stream
            last_frame = tail + encoder.error(_internal_error(record, exc))
        finally:
            state.active_streams -= 1
            # No pings after this, on every way out, cancellation included.
            state.keepalive.forget(response)
            _note_stalled(record, stalled=response.stalled)
            # Admitted but failed (or left) before the first token: still a wait.
            note_queue_wait(request, subscription)
    if last_frame is not None:
        # The API's end, or its in-stream error: it leaves together with
        # the end of the body.
        try:
            await close_event_stream(response, state.keepalive, last_frame)
        except ConnectionResetError:
            # The client went away before its end could be written (its
            # connection is closing; the handler's cancel comes next). An
            # in-stream error it missed stays the outcome.
            if record.outcome == "ok":
                record.outcome = "cancelled"
        else:
            record.bytes_sent += len(last_frame)
        finally:
            _note_stalled(record, stalled=response.stalled)
    return response


def _note_stalled(record: RequestRecord, *, stalled: bool) -> None:
    """A stream the keepalive ended for taking nothing (STREAM_MAX_LAG_S)
    is a slow reader's: the client's doing, like a disconnect."""
    if stalled:
        record.outcome, record.error_code = "cancelled", ReaderTooSlow.code


def _counted(record: RequestRecord, frames: bytes) -> bytes:
    record.bytes_sent += len(frames)
    return frames


def _first_token(request: web.Request, subscription: Subscription) -> float:
    """Record the time to first token; returns it in milliseconds."""
    record = request[RECORD]
    ttft_s = time.monotonic() - record.arrived_at
    ttft_ms = record.ttft_ms = round(ttft_s * 1000, 2)
    request.app[STATE].metrics.first_token(record.api, subscription.role, ttft_s)
    return ttft_ms


def _internal_error(record: RequestRecord, exc: Exception) -> GatewayError:
    log.exception("stream failed")
    record.outcome, record.error_code = "error", "internal_error"
    internal = GatewayError("internal error", code="internal_error")
    internal.__cause__ = exc
    return internal


async def gather(request: web.Request, subscription: Subscription) -> list[Delta]:
    """The non-streaming half: every delta of the answer, read to its end
    (a failure raises before any byte is sent, for the envelope to answer),
    then the subscription left. The record learns the queue wait and a
    cancel."""
    deltas: list[Delta] = []
    connection = client_connection(request)
    if connection is not None:
        # A client that half-closes is told apart from one that left by
        # interim responses: nothing else can be written before the answer.
        connection.probe_before_answer(request)
    async with subscription:
        try:
            while batch := await subscription.read_batch():
                deltas.extend(batch)
        finally:
            note_queue_wait(request, subscription)
    if subscription.outcome == "cancelled":
        request[RECORD].outcome = "cancelled"
    return deltas


def note_queue_wait(request: web.Request, subscription: Subscription) -> float | None:
    """Record the request's queue wait once, as soon as it is known: in the
    log line, the histogram and the rolling window (0 for followers)."""
    record = request[RECORD]
    queue_wait_s = subscription.queue_wait_s
    if record.queue_wait_ms is None and queue_wait_s is not None:
        record.queue_wait_ms = round(queue_wait_s * 1000, 2)
        request.app[STATE].metrics.admitted(queue_wait_s)
    return record.queue_wait_ms
