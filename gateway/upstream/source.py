"""An upstream answer as the actor sees it: an async iterator of Deltas with
a synchronous ``reset()`` (``actors.ports.Source``).

Composes a transport (the bytes) with a provider (the format), and owns
the two deadlines of an answer: the first token's, from the moment the
source is made until the first content delta, and the idle gap's between
reads after it. The transport's own failures (``gateway.upstream.errors``)
are translated here, once, into the gateway's errors (``gateway_error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from actors.deltas import Delta
from gateway.errors import (
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamProtocolMismatch,
    UpstreamStreamRefused,
    UpstreamStreamReset,
    UpstreamTimeout,
)
from gateway.upstream.base import ResponseHead, ResponseStream, Transport, UpstreamRequest
from gateway.upstream.deadlines import RESOLUTION, Deadline, Deadlines
from gateway.upstream.errors import (
    ConnectFailed,
    ConnectionLost,
    ProtocolMismatch,
    ProtocolViolation,
    StreamRefused,
    StreamReset,
    TransportError,
    TransportTimeout,
)
from gateway.upstream.providers import wire
from gateway.upstream.providers.base import Provider, ProviderDecoder

#: How much of an error response we read to find the provider's message.
MAX_ERROR_BODY = 64 * 1024


class UpstreamSource:
    # Slots: every open stream holds one, and an instance dict would cost
    # each idle stream ~100 bytes more.
    __slots__ = (
        "_transport",
        "_provider",
        "_request",
        "_timeouts",
        "_first_token_deadline",
        "_got_content",
        "_on_status",
        "_on_deltas",
        "_decoder",
        "_stream",
        "_pending",
        "_next",
        "_head_checked",
        "_eof",
        "_reset",
        "_read_started",
        "_reading",
        "_deadlines",
        "_watchdog",
        "_timed_out",
        "__weakref__",  # tests check that a finished source is let go
    )

    def __init__(
        self,
        transport: Transport,
        provider: Provider,
        request: UpstreamRequest,
        *,
        timeouts: SourceTimeouts,
        deadlines: Deadlines,
        on_status: Callable[[str], None] = lambda status: None,
        on_deltas: Callable[[Sequence[Delta]], None] | None = None,
    ) -> None:
        self._transport = transport
        self._provider = provider
        # Let go once sent: a prompt can be large.
        self._request: UpstreamRequest | None = request
        self._timeouts = timeouts
        # Until the first content delta the first-token deadline holds (role
        # chunks, pings and empty deltas do not count); after it, each gap
        # between reads is bounded by the idle timeout.
        loop = asyncio.get_running_loop()
        first = self._timeouts.first_token_s
        self._first_token_deadline = None if first is None else loop.time() + first
        self._got_content = False
        #: Told each upstream outcome once: the status code, "refused" when
        #: the upstream refused the stream unprocessed (every send of it), or
        #: "error" when no response came (gateway_upstream_requests_total).
        self._on_status = on_status
        #: Shown every read's deltas as they are decoded (the exchange log):
        #: a call per read, and no frame of its own in the read's await chain.
        self._on_deltas = on_deltas
        self._decoder: ProviderDecoder = provider.decoder()
        self._stream: ResponseStream | None = None
        # Deltas decoded but not yet handed out, and the next one's index: a
        # list, not a deque (an empty deque allocates a 64-slot block, ~760
        # bytes held by every idle stream).
        self._pending: list[Delta] = []
        self._next = 0
        self._head_checked = False
        self._eof = False
        self._reset = False
        # The read deadline, kept by one lazily moved watchdog (__anext__)
        # in the deadlines the gateway's sources share: one loop timer for
        # them all, owned by the app.
        self._read_started = 0.0
        self._reading = False
        self._deadlines = deadlines
        self._watchdog: Deadline | None = None
        self._timed_out = False

    async def start(self) -> None:
        """Send the request; returns once it is on the wire."""
        request, self._request = self._request, None
        assert request is not None, "start() once"
        try:
            self._stream = await self._transport.open(request)
        except TransportError as exc:
            raise gateway_error(exc) from exc

    def __aiter__(self) -> UpstreamSource:
        return self

    async def __anext__(self) -> Delta:
        """The next delta; when none is left, one read, decoded.

        The response head and every read are bounded by the deadline in
        force: the first-token one until content flows, then the idle
        timeout from the read's start. One watchdog per stream keeps it (an
        entry in the shared deadlines), moved lazily: a wait only notes when
        it started; the watchdog, when it runs, sets itself again at the
        deadline now in force, or resets the stream if that has passed,
        which ends the pending wait. That spares a loop timer armed and
        cancelled per chunk. The read is awaited right here, not in a helper
        coroutine: every idle stream holds this await chain.
        """
        while self._next == len(self._pending):
            if self._eof or self._reset:
                raise StopAsyncIteration
            self._pending.clear()
            self._next = 0
            try:
                if (failure := self._decoder.failure) is not None:
                    # Only now: the deltas decoded with it went first.
                    raise failure
                try:
                    if not self._head_checked:
                        self._start_wait()
                        await self._check_head()
                    self._start_wait()
                    data = await self._stream_read()
                except TransportError as exc:
                    if self._timed_out:
                        raise self._timeout_error() from exc
                    raise gateway_error(exc) from exc
                finally:
                    self._reading = False
                self._decode(data)
                # A read that decodes to no delta (a role chunk) loops to
                # the next wait, which must not hold this read's bytes.
                del data
            except Exception:
                # A source that fails cleans up after itself (actors.ports):
                # a stream we can no longer decode must not stay open upstream.
                self.reset()
                raise
        delta = self._pending[self._next]
        self._next += 1
        return delta

    def reset(self) -> None:
        self._reset = True
        self._disarm()
        if self._stream is not None:
            self._stream.reset()

    def _start_wait(self) -> None:
        """Note when a wait on the upstream starts, for the watchdog."""
        self._read_started = asyncio.get_running_loop().time()
        if self._watchdog is None:
            self._arm()
        self._reading = True

    def _stream_read(self) -> Awaitable[bytes]:
        assert self._stream is not None, "start() first"
        return self._stream.read()

    def _decode(self, data: bytes) -> None:
        """One read into ``_pending``; ``b""`` is the transport's end."""
        assert self._stream is not None
        if self._timed_out:
            raise self._timeout_error()
        if data:
            deltas = self._decoder.feed(data)
            if self._on_deltas is not None and deltas:
                self._on_deltas(deltas)
            if not self._got_content and any(delta.is_content for delta in deltas):
                self._got_content = True
                self._disarm()  # the idle deadline may come before the first-token one
            self._pending.extend(deltas)
            if self._decoder.done:
                # The provider's terminator ([DONE], message_stop) is the end
                # of the answer, whenever the transport's end follows it.
                self._eof = True
                self._disarm()
                self._stream.release()
        else:
            self._eof = True
            self._disarm()
            deltas = self._decoder.close()
            if self._on_deltas is not None and deltas:
                self._on_deltas(deltas)
            self._pending.extend(deltas)

    def _deadline(self) -> float | None:
        if not self._got_content:
            return self._first_token_deadline
        idle = self._timeouts.idle_s
        return None if idle is None else self._read_started + idle

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is not None:
            self._watchdog = self._deadlines.call_at(deadline, self._on_watchdog)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._deadlines.cancel(self._watchdog)
            self._watchdog = None

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self._eof or self._reset or self._stream is None or not self._reading:
            # Only a pending wait can time out: time the consumer spends
            # between reads is not the upstream's (the next read re-arms).
            return
        deadline = self._deadline()
        # Due within the deadlines' resolution, as they count it: re-armed
        # there, it would run again in the same pass, again and again until
        # uvloop's millisecond clock ticks over.
        if deadline is not None and asyncio.get_running_loop().time() + RESOLUTION < deadline:
            self._arm()  # reads went on meanwhile: the deadline moved
        elif deadline is not None:
            self._timed_out = True
            self._stream.reset()  # the pending wait ends; it raises the timeout

    def _timeout_error(self) -> UpstreamTimeout:
        what = "went idle" if self._got_content else "sent no first token"
        return UpstreamTimeout(f"upstream stream {what} within its timeout")

    async def _check_head(self) -> None:
        assert self._stream is not None
        try:
            head = await self._stream.head()
        except TransportError as exc:
            self._on_status(no_response_status(exc))
            raise
        self._head_checked = True
        self._on_status(str(head.status))
        if head.status != 200:
            body = await self._read_error_body()
            raise self._provider.error_from_response(head, body)
        coding = wire.content_coding(head)
        if coding is not None:
            # The decoder would take the compressed bytes for an event
            # stream with no events in it.
            raise UpstreamProtocolError(f"upstream sent its event stream with Content-Encoding {coding}")

    async def _read_error_body(self) -> bytes:
        """The error response's body, or nothing if it is cut off (the
        connection lost, the first-token deadline passed): the status is
        the upstream's answer all the same, and part of a body is no
        message."""
        assert self._stream is not None
        try:
            return await read_bounded(self._stream, MAX_ERROR_BODY)
        except TransportError:
            return b""
        finally:
            self._stream.release()


async def read_bounded(stream: ResponseStream, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes: never more in memory."""
    parts: list[bytes] = []
    size = 0
    while size < limit and (data := await stream.read()):
        parts.append(data)
        size += len(data)
    return b"".join(parts)[:limit]


async def fetch(
    transport: Transport, request: UpstreamRequest, limit: int, *, timeout_s: float
) -> tuple[ResponseHead, bytes]:
    """One whole (small) response: its head and the first ``limit`` bytes of
    its body. For requests outside a stream, such as the model list. All of
    it within ``timeout_s``: the transport bounds connecting and sending,
    not the answer, and an upstream that takes the request and never
    answers would hold it open for good."""
    try:
        async with asyncio.timeout(timeout_s):
            stream = await transport.open(request)
            try:
                return await stream.head(), await read_bounded(stream, limit)
            finally:
                stream.release()
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream did not answer within {timeout_s:g} s") from exc
    except TransportError as exc:
        raise gateway_error(exc) from exc


def no_response_status(exc: TransportError) -> str:
    """The ``status`` label of an upstream request that got no response
    head: "refused" when the upstream did not process it (REFUSED_STREAM,
    RFC 9113 §8.7, or above a GOAWAY's last-stream-id, §6.8; the pool sent
    it again as often as it may), "error" for any other failure."""
    return "refused" if isinstance(exc, StreamRefused) else "error"


#: The transport's causes, as the gateway's errors (and so HTTP statuses and
#: error codes) say them. Order matters: a subclass before its base.
_AS_GATEWAY_ERROR: tuple[tuple[type[TransportError], type[UpstreamError]], ...] = (
    (ConnectFailed, UpstreamConnectError),
    (ConnectionLost, UpstreamConnectionLost),
    (StreamRefused, UpstreamStreamRefused),
    (StreamReset, UpstreamStreamReset),
    (ProtocolViolation, UpstreamProtocolError),
    (TransportTimeout, UpstreamTimeout),
)


def gateway_error(exc: TransportError) -> UpstreamError:
    """The gateway's error for a transport failure, with the same message."""
    message = str(exc)
    if isinstance(exc, ProtocolMismatch):
        return UpstreamProtocolMismatch(message, negotiated=exc.negotiated)
    for cause, error in _AS_GATEWAY_ERROR:
        if isinstance(exc, cause):
            return error(message)
    return UpstreamError(message)


@dataclass(frozen=True, slots=True)
class SourceTimeouts:
    """The gateway's settings give the values (``gateway.config.Settings``)."""

    #: From sending the request to the first content delta.
    first_token_s: float | None
    #: Between two reads once content flows.
    idle_s: float | None


def source_opener(
    transport: Transport,
    provider: Provider,
    request: UpstreamRequest,
    *,
    timeouts: SourceTimeouts,
    deadlines: Deadlines,
    on_status: Callable[[str], None] = lambda status: None,
    on_deltas: Callable[[Sequence[Delta]], None] | None = None,
) -> Callable[[], Awaitable[UpstreamSource]]:
    """The ``open_source`` callable the registry's actor calls after admission."""

    async def open_source() -> UpstreamSource:
        source = UpstreamSource(
            transport,
            provider,
            request,
            timeouts=timeouts,
            deadlines=deadlines,
            on_status=on_status,
            on_deltas=on_deltas,
        )
        try:
            await source.start()
        except UpstreamError as exc:
            on_status("refused" if isinstance(exc, UpstreamStreamRefused) else "error")
            raise
        return source

    return open_source
