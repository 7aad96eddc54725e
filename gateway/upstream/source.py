"""An upstream answer as the actor sees it: an async iterator of Deltas with
a synchronous ``reset()`` (``actors.ports.Source``).

Composes a transport (the bytes) with a provider (the format). The one retry
the gateway allows happens here, because only here is it known that nothing
has reached a client yet: a stream the upstream refused before processing it
(REFUSED_STREAM, or above a GOAWAY's last_stream_id; RFC 9113 §8.7) is sent
once more, and the pool puts it on another connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from actors.deltas import Delta
from gateway.errors import (
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamStreamRefused,
    UpstreamTimeout,
)
from gateway.upstream.base import ResponseStream, Transport, UpstreamRequest
from gateway.upstream.deadlines import RESOLUTION, Deadline, Deadlines
from gateway.upstream.providers.base import Provider, ProviderDecoder

#: How much of an error response we read to find the provider's message.
MAX_ERROR_BODY = 64 * 1024


class UpstreamSource:
    # Slots: every open stream holds one (tests/perf/PROFILES.md, memory).
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
        timeouts: SourceTimeouts | None = None,
        deadlines: Deadlines | None = None,
        on_status: Callable[[str], None] = lambda status: None,
        on_deltas: Callable[[Sequence[Delta]], None] | None = None,
    ) -> None:
        self._transport = transport
        self._provider = provider
        # Kept for the one retry, then let go: a prompt can be large, and an
        # open stream should not hold it once the upstream has answered.
        self._request: UpstreamRequest | None = request
        self._timeouts = timeouts or SourceTimeouts()
        # Until the first content delta the first-token deadline holds (role
        # chunks, pings and empty deltas do not count); after it, each gap
        # between reads is bounded by the idle timeout.
        loop = asyncio.get_running_loop()
        first = self._timeouts.first_token_s
        self._first_token_deadline = None if first is None else loop.time() + first
        self._got_content = False
        #: Told each upstream outcome once: the status code, or "error" when
        #: no response came (for gateway_upstream_requests_total).
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
        # in the deadlines the gateway's sources share (one loop timer for
        # them all), or in ones of its own.
        self._read_started = 0.0
        self._reading = False
        self._deadlines = Deadlines() if deadlines is None else deadlines
        self._watchdog: Deadline | None = None
        self._timed_out = False

    async def start(self) -> None:
        """Send the request; returns once it is on the wire."""
        assert self._request is not None, "start() once"
        self._stream = await self._transport.open(self._request)

    def __aiter__(self) -> UpstreamSource:
        return self

    async def __anext__(self) -> Delta:
        """The next delta; when none is left, one read, decoded.

        The read is bounded by the deadline in force: the first-token one
        until content flows, then the idle timeout from the read's start.
        One watchdog per stream keeps it (an entry in the shared deadlines),
        moved lazily: a read only notes when it started; the watchdog, when
        it runs, sets itself again at the deadline now in force, or resets
        the stream if that has passed, which ends the pending read. An
        ``asyncio.timeout`` per read (a timer armed and cancelled per chunk)
        was ~17 % of the gateway's CPU while relaying (tests/perf/PROFILES.md).
        The read is awaited right here, not in a helper coroutine: every idle
        stream holds this await chain.
        """
        while self._next == len(self._pending):
            if self._eof or self._reset:
                raise StopAsyncIteration
            self._pending.clear()
            self._next = 0
            try:
                if not self._head_checked:
                    await self._check_head()
                try:
                    data = await self._start_read()
                except UpstreamError as exc:
                    # The transport's first-byte deadline is set from the same
                    # moment as our first-token one and may fire first: either
                    # way, the source's words for it. (Its idle timeout keeps
                    # its own words: ours had not passed.)
                    if self._timed_out or isinstance(exc, UpstreamFirstByteTimeout):
                        raise self._timeout_error() from exc
                    raise
                finally:
                    self._reading = False
                self._decode(data)
                # Else this frame keeps the bytes while the next read waits.
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

    def _start_read(self) -> Awaitable[bytes]:
        """Note the read's start for the watchdog; the read to await."""
        assert self._stream is not None, "start() first"
        self._read_started = asyncio.get_running_loop().time()
        if self._watchdog is None:
            self._arm()
        self._reading = True
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
            # Only a pending read can time out: time the consumer spends
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
            self._stream.reset()  # the pending read returns; it raises the timeout

    def _timeout_error(self) -> UpstreamTimeout:
        what = "went idle" if self._got_content else "sent no first token"
        return UpstreamTimeout(f"upstream stream {what} within its timeout")

    async def _check_head(self) -> None:
        assert self._stream is not None
        try:
            try:
                head = await self._stream.head()
            except UpstreamStreamRefused:
                # Never processed upstream and nothing sent to any client: once.
                self._on_status("refused")
                assert self._request is not None
                self._stream = await self._transport.open(self._request)
                head = await self._stream.head()
        except UpstreamError:
            self._on_status("error")
            raise
        self._head_checked = True
        self._request = None  # answered: no retry any more
        self._on_status(str(head.status))
        if head.status != 200:
            body = await self._read_error_body()
            raise self._provider.error_from_response(head, body)

    async def _read_error_body(self) -> bytes:
        assert self._stream is not None
        try:
            return await read_bounded(self._stream, MAX_ERROR_BODY)
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


@dataclass(frozen=True, slots=True)
class SourceTimeouts:
    #: From sending the request to the first content delta.
    first_token_s: float | None = 60.0
    #: Between two reads once content flows.
    idle_s: float | None = 30.0


def source_opener(
    transport: Transport,
    provider: Provider,
    request: UpstreamRequest,
    *,
    timeouts: SourceTimeouts | None = None,
    deadlines: Deadlines | None = None,
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
        except UpstreamError:
            on_status("error")
            raise
        return source

    return open_source
