"""One HTTP/2 request in flight, as its consumer sees it.

The connection's read path feeds a stream through plain ``def`` callbacks
(``on_head``, ``on_data``, ``on_end``, ``on_error``); the consumer awaits
``head()`` and ``read()``. Flow-control credit goes back to the peer only as
the consumer takes data (RFC 9113 §5.2.2 leaves the policy to us: this one
makes a slow consumer throttle its own stream and nobody else's), so what a
stream buffers is bounded by the stream window we advertise.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.errors import UpstreamError, UpstreamFirstByteTimeout, UpstreamStreamReset, UpstreamTimeout
from gateway.upstream.base import ResponseHead
from gateway.upstream.deadlines import Deadline, Deadlines

if TYPE_CHECKING:
    from gateway.upstream.h2.connection import H2ClientConnection


class H2ResponseStream:
    """Implements ``gateway.upstream.base.ResponseStream`` for one HTTP/2 stream."""

    __slots__ = (
        "stream_id",
        "_conn",
        "_head",
        "_chunks",
        "_unacknowledged",
        "_waiter",
        "_ended",
        "_error",
        "_finished",
        "_idle_timeout",
        "_got_data",
        "_deadlines",
        "_first_deadline",
        "_idle_deadline",
    )

    def __init__(
        self,
        conn: H2ClientConnection,
        stream_id: int,
        *,
        first_byte_deadline: float | None,
        idle_timeout: float | None,
        deadlines: Deadlines,
    ) -> None:
        self.stream_id = stream_id
        self._conn = conn
        # None once handed to the consumer: an open stream does not keep the
        # response headers (~650 bytes each; tests/perf/PROFILES.md).
        self._head: asyncio.Future[ResponseHead] | None = (
            asyncio.get_running_loop().create_future()
        )
        # DATA payloads not yet read, and their flow-controlled length: that
        # includes padding, and it is what must be acknowledged to re-open
        # the window. A list, not a deque: an empty deque allocates a 64-slot
        # block (~760 bytes) that every idle stream would hold.
        self._chunks: list[bytes] = []
        self._unacknowledged = 0
        self._waiter: asyncio.Future[bytes] | None = None
        self._ended = False
        self._error: UpstreamError | None = None
        # Reset by us, failed, or ended and fully read: nothing more to do.
        self._finished = False
        self._idle_timeout = idle_timeout
        self._got_data = False
        # One deadline for the head and the first DATA together (the pool's
        # first-byte deadline for the request), rather than a timeout context
        # around each wait: two per request. It is an entry in the pool's
        # shared deadlines, not a loop timer of its own (~580 bytes under
        # uvloop, held by every stream still waiting).
        self._deadlines = deadlines
        self._first_deadline: Deadline | None = None
        self._idle_deadline: Deadline | None = None
        if first_byte_deadline is not None:
            self._first_deadline = deadlines.call_at(first_byte_deadline, self._first_deadline_passed)

    # -- fed by the connection's read path (synchronous) ------------------------

    def on_head(self, head: ResponseHead) -> None:
        if (waiting := self._head_waiting()) is not None:
            waiting.set_result(head)

    def on_data(self, data: bytes, flow_controlled_length: int) -> None:
        if self._finished or not data:
            # Nobody will read it (or there is nothing to read: an empty or
            # padding-only DATA frame is legal and must not pass for the end
            # of the body): hand the credit back at once, or the connection
            # window leaks (FIELD-NOTES: ~1,000 abandoned streams would
            # exhaust a 65,535-byte window).
            self._conn.acknowledge(self.stream_id, flow_controlled_length)
            return
        self._chunks.append(data)
        self._unacknowledged += flow_controlled_length
        self._wake()

    def on_end(self) -> None:
        self._ended = True
        self._stop_first_deadline()
        self._wake()

    def on_error(self, exc: UpstreamError) -> None:
        self._error = exc
        if (waiting := self._head_waiting()) is not None:
            waiting.set_exception(exc)
            # The consumer may never call head() (it was reset, say): mark
            # the exception retrieved so asyncio does not log it as lost.
            waiting.exception()
        self._release_buffer()
        self._wake()

    @property
    def error(self) -> UpstreamError | None:
        """Why the stream failed, if it did."""
        return self._error

    # -- the consumer's side ----------------------------------------------------

    async def head(self) -> ResponseHead:
        """The response head, handed over once: the stream lets it go."""
        future = self._head
        if future is None:
            raise RuntimeError("the response head was already taken")
        # Shielded: a waiter's cancellation must not cancel the head itself.
        head = future.result() if future.done() else await asyncio.shield(future)
        self._head = None
        return head

    def read(self) -> asyncio.Future[bytes]:
        """The next piece of the body, ``b""`` at its end, as a future: a
        plain function hands it out, so neither a read nor a waiting stream
        costs a coroutine (tests/perf/PROFILES.md, item 19). A pending read
        is given its data by the read path (``_wake``) as it arrives, so a
        read cancelled once given its data loses it: cancel a read only to
        abandon the stream, and reset it (as the gateway's actor does)."""
        waiter = asyncio.get_running_loop().create_future()
        # A read abandoned before (its reader cancelled) may have left its
        # idle deadline behind: it must not time this one.
        self._stop_idle_deadline()
        if not self._settle(waiter):
            self._waiter = waiter
            if self._got_data and self._idle_timeout is not None:
                # Before the first DATA the first-byte deadline keeps the
                # time; after it, without an idle timeout of ours (the
                # gateway's source times idle gaps), nothing does here.
                when = asyncio.get_running_loop().time() + self._idle_timeout
                self._idle_deadline = self._deadlines.call_at(when, self._idle_deadline_passed)
        return waiter

    def reset(self) -> None:
        """Send RST_STREAM(CANCEL) now (RFC 9113 §6.4): it is on the socket
        when this returns. Idempotent; a no-op for a finished stream."""
        if self._finished:
            return
        self._finished = True
        if not (self._ended or self._error is not None):
            self._conn.reset_stream(self.stream_id)
        self._release_buffer()
        if (waiting := self._head_waiting()) is not None:
            waiting.set_exception(UpstreamStreamReset("stream was reset by the gateway"))
            waiting.exception()
        self._wake()

    def release(self) -> None:
        if not (self._ended or self._error is not None):
            self.reset()
        self._finished = True
        self._release_buffer()

    # -- internals -------------------------------------------------------------

    def _head_waiting(self) -> asyncio.Future[ResponseHead] | None:
        """The head's future while it has no outcome yet."""
        head = self._head
        return None if head is None or head.done() else head

    def _settle(self, waiter: asyncio.Future[bytes]) -> bool:
        """Give ``waiter`` what a read gets now, if there is anything."""
        if self._chunks:
            # Everything buffered at once: the decoder takes any split, and
            # under load one read per burst beats one per frame.
            chunks, self._chunks = self._chunks, []
            if not self._got_data:
                self._got_data = True
                self._stop_first_deadline()
            length, self._unacknowledged = self._unacknowledged, 0
            self._conn.consumed(self.stream_id, length)
            waiter.set_result(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        elif self._error is not None:
            waiter.set_exception(self._error)
        elif self._ended or self._finished:
            if not self._finished:
                self._finished = True
                self._acknowledge_buffered()  # settles what reads left owed
            waiter.set_result(b"")
        else:
            return False
        self._stop_idle_deadline()
        return True

    def _idle_deadline_passed(self) -> None:
        self._idle_deadline = None
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return  # the read was answered or abandoned meanwhile
        self._time_out(UpstreamTimeout("upstream stream went idle past its timeout"), waiter)

    def _stop_idle_deadline(self) -> None:
        if self._idle_deadline is not None:
            self._deadlines.cancel(self._idle_deadline)
            self._idle_deadline = None

    def _first_deadline_passed(self) -> None:
        """The first-byte timeout: no head, or no DATA yet, at its deadline.
        Reset the stream; the consumer's wait ends with the timeout."""
        self._first_deadline = None
        if self._got_data or self._chunks or self._ended or self._finished or self._error is not None:
            return
        if (waiting := self._head_waiting()) is not None:
            timeout = UpstreamTimeout("upstream sent no response headers in time")
            waiting.set_exception(timeout)
            waiting.exception()  # retrieved: the consumer may be gone
        else:
            timeout = UpstreamFirstByteTimeout("upstream stream sent no data past its timeout")
        waiter, self._waiter = self._waiter, None
        self._time_out(timeout, waiter)

    def _time_out(self, timeout: UpstreamTimeout, waiter: asyncio.Future[bytes] | None) -> None:
        """Reset the stream at a deadline; the pending read (``waiter``, held
        back from reset()'s wake, which would answer it with the end) and
        every later one raise ``timeout``."""
        self.reset()
        # Set after reset(), which sends RST_STREAM only to a stream without
        # an error.
        self._error = timeout
        if waiter is not None and not waiter.done():
            waiter.set_exception(timeout)

    def _stop_first_deadline(self) -> None:
        if self._first_deadline is not None:
            self._deadlines.cancel(self._first_deadline)
            self._first_deadline = None

    def _wake(self) -> None:
        """Answer a pending read with what just came (data, end, failure)."""
        waiter = self._waiter
        if waiter is None:
            return
        if waiter.done():
            self._waiter = None  # abandoned: its reader was cancelled
        elif self._settle(waiter):
            self._waiter = None  # answered: not to keep its data alive here

    def _release_buffer(self) -> None:
        """Acknowledge what will never be read, so the connection window
        stays whole."""
        self._stop_first_deadline()
        self._stop_idle_deadline()
        self._chunks.clear()
        self._acknowledge_buffered()

    def _acknowledge_buffered(self) -> None:
        length, self._unacknowledged = self._unacknowledged, 0
        self._conn.acknowledge(self.stream_id, length)
