"""Subscription: what a request handler holds, a cursor into one actor's log.

Reading never copies a chunk: ``__anext__`` hands out the logged Delta itself
and ``read_batch`` (or ``take_batch``) a slice of references, and every
subscriber of a stream gets the very same objects. At the end of the log a
subscription either stops (complete) or raises the stream's failure, after
every delta logged before it.

Leaving is synchronous (``close()``), so a handler can leave from a ``finally``
or ``__aexit__`` while being cancelled; if it was the last subscriber, the
upstream is reset before ``close()`` returns. ``close()`` may also come from
another task (an explicit cancel): the reader, if parked, is woken and stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal, NoReturn

from actors.actor import StreamActor
from actors.deltas import Delta, StreamInfo
from actors.messages import Abandoned, Completed, Failed, Shutdown, SlowReader, StreamEnd

__all__ = ["Outcome", "Role", "Subscription"]

Role = Literal["leader", "follower"]
Outcome = Literal["pending", "complete", "failed", "cancelled"]


class Subscription:
    """A cursor into a StreamActor's log, plus what the handler reports."""

    __slots__ = (
        "_actor",
        "_closed",
        "_cursor",
        "_lagged",
        "_on_close",
        "_outcome",
        "_waiter",
        "arrived_at",
        "key",
        "owner",
        "request_id",
        "role",
        "stream_id",
    )

    def __init__(
        self,
        *,
        actor: StreamActor,
        request_id: str,
        role: Role,
        arrived_at: float,
        cursor: int = 0,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        self._actor = actor
        self.request_id = request_id
        self.key = actor.key
        self.role: Role = role
        self.arrived_at = arrived_at
        #: Unique per actor: lets the HTTP face memoize per-stream encodings.
        self.stream_id = actor.stream_id
        #: Opaque: who may cancel this subscription by its request id (the
        #: HTTP face sets a hash of the client's credential); None: anyone.
        self.owner: str | None = None
        self._cursor = cursor
        self._on_close = on_close
        self._outcome: Outcome = "pending"
        self._closed = False
        self._lagged: SlowReader | None = None
        #: What the reader awaits, from ``readable()`` until it next takes
        #: deltas (None: it is not parked).
        self._waiter: asyncio.Future[None] | None = None

    # -- what the handler reports ------------------------------------------------------

    @property
    def queue_wait_s(self) -> float | None:
        """Leader: admission minus arrival, once admitted. Follower: 0.0 (it
        takes no slot), unless the stream it joined is not admitted: a stream
        shed from the queue has no admission for any of its subscribers."""
        if self.role == "follower":
            return None if self._actor.unadmitted else 0.0
        admitted_at = self._actor.admitted_at
        if admitted_at is None:
            return None
        return max(0.0, admitted_at - self.arrived_at)

    @property
    def subscribers(self) -> int:
        """Current subscribers of this subscription's stream."""
        return self._actor.subscriber_count

    @property
    def created(self) -> int:
        """Unix seconds at the stream's start, the same for every subscriber."""
        return self._actor.created

    @property
    def info(self) -> StreamInfo | None:
        """What the upstream said about the whole answer (its resolved model):
        the same for every subscriber, a resumed one included."""
        return self._actor.info

    @property
    def memo(self) -> dict[object, dict[int, object]]:
        """The stream's scratch space, shared by all its subscribers (for
        encoding a delta once, however many read it)."""
        return self._actor.memo

    @property
    def cursor(self) -> int:
        """Deltas delivered so far (a resumed subscription counts the skipped
        ones): the sequence number of the last delivered delta."""
        return self._cursor

    @property
    def at_end(self) -> bool:
        """Every delta is taken and the stream has ended: the next
        ``take_batch()`` returns the end (or raises its failure) at once.
        A writer can then send what it took together with its last frame."""
        actor = self._actor
        return actor.end is not None and self._cursor == actor.appended

    @property
    def waiting(self) -> bool:
        """Parked in ``readable()`` since it last took a delta: it had read
        every one logged when it parked."""
        return self._waiter is not None

    @property
    def outcome(self) -> Outcome:
        return self._outcome

    @property
    def closed(self) -> bool:
        return self._closed

    # -- reading -----------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delta:
        while not self._closed:
            if self._lagged is not None:
                self._raise_lagged(self._lagged)
            delta = self._actor.delta_after(self._cursor)
            if delta is not None:
                self._cursor += 1
                self._waiter = None
                return delta
            end = self._actor.end
            if end is not None:
                self._reach(end)
                break
            await self.readable()
        raise StopAsyncIteration

    async def read_batch(self) -> Sequence[Delta]:
        """Every delta available after the cursor, waiting for at least one.

        An empty sequence means the end (completed, or this subscription was
        closed); a failed stream raises its error once the log is read.
        """
        while (batch := self.take_batch()) is None:
            await self.readable()
        return batch

    def take_batch(self, limit: int | None = None) -> Sequence[Delta] | None:
        """``read_batch()`` without the wait: the deltas available now, an
        empty sequence at the end (a failure raises), or None when there is
        nothing yet and the reader should await ``readable()``.

        The HTTP face's relay loop uses this pair: its task then waits on
        the actor's future directly, and neither each batch nor each parked
        stream costs a coroutine of ``read_batch`` (~230 bytes held per idle stream).
        """
        if self._closed:
            return ()
        if self._lagged is not None:
            self._raise_lagged(self._lagged)
        # At most ``limit`` at once: a reader's cursor then says what it has
        # written, and a slow one lags in the shared log (where the actor's
        # bound sees it), not in a copy of its own.
        batch = self._actor.deltas_after(self._cursor, limit)
        if batch:
            self._cursor += len(batch)
            self._waiter = None
            return batch
        end = self._actor.end
        if end is not None:
            self._reach(end)
            return ()
        return None

    def readable(self) -> asyncio.Future[None]:
        """What a reader awaits when ``take_batch()`` has nothing: the next
        append or the end. Handed out by a plain function, not awaited in a
        coroutine of its own: one frame less that every parked reader holds.
        Asked for only with nothing left to read: the reader is caught up
        until it next takes deltas (``waiting``). ``close()`` only wakes a
        waiter not done yet."""
        waiter = self._waiter = self._actor.new_waiter()
        return waiter

    def fall_behind(self, error: SlowReader) -> None:
        """The actor ended this reader for lagging (it has left the stream
        already): its next read raises ``error``."""
        self._lagged = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _raise_lagged(self, error: SlowReader) -> NoReturn:
        self._outcome = "failed"
        raise error

    def _reach(self, end: StreamEnd) -> None:
        """The log is read to its end: record the outcome, raise a failure."""
        match end:
            case Completed():
                self._outcome = "complete"
            case Abandoned():
                self._outcome = "cancelled"
            case Failed(error=error, traceback=traceback):
                self._outcome = "failed"
                _reraise(error, traceback)
            case Shutdown(reason=reason):
                self._outcome = "failed"
                _reraise(reason, None)

    # -- leaving -----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the stream. Synchronous and idempotent; if this was the last
        subscriber of an unfinished stream, the upstream is reset (or never
        opened) by the time this returns."""
        if self._closed:
            return
        self._closed = True
        if self._outcome == "pending":
            self._outcome = "cancelled"
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Closed from another task (explicit cancel): let the reader stop.
            waiter.set_result(None)
        try:
            self._actor.leave(self)
        finally:
            if self._on_close is not None:
                self._on_close(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.request_id} {self.role} stream={self.stream_id} "
            f"cursor={self._cursor} {self._outcome}>"
        )


def _reraise(error: BaseException, traceback: TracebackType | None) -> NoReturn:
    # The same exception object goes to every subscriber: reset its traceback
    # first, so it does not pile up every subscriber's frames.
    raise error.with_traceback(traceback)
