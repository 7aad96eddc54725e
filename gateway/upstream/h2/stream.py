"""One HTTP/2 request in flight, as its consumer sees it.

The connection feeds a stream through plain ``def`` callbacks (``on_head``,
``on_data``, ``on_end``, ``on_error``); the consumer awaits ``head()`` and
``read()``. The stream reaches its connection only through ``StreamOwner``
(credit consumed bytes, let the stream go) and its pool only through
``Resender`` (send a refused request again), so neither module imports the
other's class.

Flow-control credit goes back as the consumer takes data (RFC 9113 §5.2.2
leaves the policy to the receiver: this one makes a slow consumer throttle
its own stream and nobody else's), so what a stream buffers is bounded by
the stream window we advertise.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from gateway.upstream.base import ResponseHead, UpstreamRequest
from gateway.upstream.errors import ProtocolViolation, StreamRefused, StreamReset, TransportError

#: How many times one request is sent in all when the upstream refuses it
#: unprocessed (REFUSED_STREAM, or above a GOAWAY's last-stream-id): enough
#: to ride over connections that reach their request limit, bounded so a
#: server refusing everything cannot loop us.
MAX_SENDS: Final = 3


class StreamOwner(Protocol):
    """The connection a stream is on, as the stream needs it."""

    def consumed(self, stream_id: int, length: int) -> None:
        """The consumer took ``length`` bytes: credit them (batched)."""
        ...

    def release(self, stream_id: int) -> None:
        """The consumer needs nothing more: RST_STREAM if the stream is still
        open (written before this returns), and all its credit returned."""
        ...


class Resender(Protocol):
    """The pool, as a refused stream needs it."""

    async def resend(self, stream: H2ResponseStream) -> None:
        """Send the stream's request again, on a connection that takes it."""
        ...


class H2ResponseStream:
    """Implements ``gateway.upstream.base.ResponseStream`` for one HTTP/2
    request, which may be sent more than once if refused unprocessed.
    One consumer at a time awaits it."""

    __slots__ = (
        "stream_id",
        "_owner",
        "_resender",
        "_request",
        "_sends",
        "_head",
        "_head_taken",
        "_chunks",
        "_waiter",
        "_ended",
        "_error",
        "_finished",
    )

    def __init__(self, request: UpstreamRequest, resender: Resender) -> None:
        self.stream_id = 0
        self._owner: StreamOwner | None = None
        self._resender = resender
        # Kept to send again while the request may still be refused; let go
        # once the response head came (a prompt can be large).
        self._request: UpstreamRequest | None = request
        self._sends = 0
        self._head: ResponseHead | None = None
        self._head_taken = False
        # Body pieces not yet read. A list, not a deque: an empty deque
        # allocates a 64-slot block that every idle stream would hold.
        self._chunks: list[bytes] = []
        # Woken (set to None) when anything arrives; it never carries data,
        # so a read cancelled while waiting loses nothing.
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: TransportError | None = None
        # Reset or released by the consumer: nothing more to do.
        self._finished = False

    # -- the connection's side (synchronous) -------------------------------------

    def bind(self, owner: StreamOwner, stream_id: int) -> None:
        """The request went out as ``stream_id`` on ``owner``."""
        self._owner = owner
        self.stream_id = stream_id
        self._sends += 1
        self._error = None

    def on_head(self, head: ResponseHead) -> None:
        self._head = head
        self._request = None  # processed: it will not be sent again
        self._wake()

    def on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def on_end(self) -> None:
        self._ended = True
        self._wake()

    def on_error(self, exc: TransportError) -> None:
        """The stream failed; the owner has already let it go. What arrived
        before the failure was sent by the peer and stays readable: reads
        return it first, then raise ``exc``."""
        self._error = exc
        self._owner = None
        self._wake()

    @property
    def error(self) -> TransportError | None:
        """Why the stream failed, if it did."""
        return self._error

    @property
    def may_resend(self) -> bool:
        """Refused unprocessed, still wanted, and sends left."""
        return (
            isinstance(self._error, StreamRefused)
            and self._request is not None
            and not self._finished
            and self._sends < MAX_SENDS
        )

    @property
    def is_reset(self) -> bool:
        """Reset (or released) by the consumer: nothing more is sent for it."""
        return self._finished

    @property
    def request(self) -> UpstreamRequest:
        assert self._request is not None, "the request was answered"
        return self._request

    # -- the consumer's side -------------------------------------------------------

    async def head(self) -> ResponseHead:
        """The response head, handed over once: the stream lets it go. A
        request refused unprocessed is sent again first (``MAX_SENDS``)."""
        if self._head_taken:
            raise RuntimeError("the response head was already taken")
        while (head := self._head) is None:
            if self.may_resend:
                await self._send_again()
            elif self._error is not None:
                raise self._error
            elif self._finished:
                raise StreamReset("stream was reset by the gateway")
            elif self._ended:
                raise ProtocolViolation("upstream ended the stream without a response head")
            else:
                await self._wait()
        self._head = None
        self._head_taken = True
        return head

    async def read(self) -> bytes:
        """The next piece of the body, ``b""`` at its end (or once reset). A
        request refused unprocessed is sent again first, as in ``head()``.
        Everything buffered comes at once: the decoder takes any split, and
        under load one read per burst beats one per frame. Safe to cancel:
        data stays buffered until a read returns it."""
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if self._owner is not None:
                    self._owner.consumed(self.stream_id, len(data))
                return data
            if self._error is not None:
                if self.may_resend:
                    await self._send_again()
                    continue
                raise self._error
            if self._ended or self._finished:
                self.release()  # read to its end: the credit goes back
                return b""
            # Waited for here rather than in _wait(): every idle stream holds
            # this await chain, one coroutine shorter.
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def reset(self) -> None:
        """Abandon the request: RST_STREAM(CANCEL) is on the socket when this
        returns (RFC 9113 §6.4), if the stream was still open. Idempotent;
        pending and later reads return ``b""``."""
        if self._finished:
            return
        self._finished = True
        self._request = None
        self._chunks.clear()
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.release(self.stream_id)
        self._wake()

    def release(self) -> None:
        """The consumer needs nothing more: ended streams are given back,
        unfinished ones reset (both through the owner)."""
        self.reset()

    # -- internals -------------------------------------------------------------------

    async def _send_again(self) -> None:
        """The refused request, sent again by the resender, which may wait
        for a stream slot, a connection or send window. That runs in a task
        of its own, so that a reset meanwhile (a deadline passed, say) ends
        the wait at once rather than when a slot frees, and the stream then
        reads as reset, whatever the resend came to."""
        sending = asyncio.get_running_loop().create_task(self._resender.resend(self), name="h2-resend")
        sending.add_done_callback(lambda _: self._wake())
        try:
            while not (sending.done() or self._finished):
                await self._wait()
        finally:
            if not sending.done():
                sending.cancel()
                await asyncio.wait((sending,))
            elif not sending.cancelled():
                sending.exception()  # retrieved, if we are cancelled now
        error = None if sending.cancelled() else sending.exception()
        if self._finished:
            self._error = None
        elif error is not None:
            raise error

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
