"""Server-sent events: framing, the early ping, keepalive.

Frames are built as bytes once and written whole (one ``write`` per frame, so
a keepalive ping can never land inside one). The response is aiohttp-sse's
``EventSourceResponse``: it sets the SSE headers (``Cache-Control: no-cache``,
``X-Accel-Buffering: no`` for nginx) and has the kernel abort a peer that
stops acknowledging (TCP_USER_TIMEOUT). Its per-response ping task is not
used: one ``Keepalive`` task pings every open stream (a task per stream cost
~1.1 KiB of each idle stream).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import structlog
from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import BaseRequest, StreamResponse
from aiohttp_sse import EventSourceResponse

from gateway import json_codec

log = structlog.get_logger("gateway")

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"

_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
#: How long written bytes may go unacknowledged before the kernel aborts the
#: connection: aiohttp-sse's default send timeout.
SEND_TIMEOUT_S: float = EventSourceResponse.DEFAULT_SEND_TIMEOUT or 120.0


def dumps(value: Any) -> str:
    """Compact JSON as text (for ``web.json_response``)."""
    return json_codec.dumps(value).decode()


def data_frame(payload: Any) -> bytes:
    """``data: <json>`` -- compact JSON has no newlines, so one data line."""
    return b"data: " + json_codec.dumps(payload) + b"\n\n"


def event_frame(event: str, payload: Any, *, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id is not None else f"event: {event}\ndata: "
    return head.encode() + json_codec.dumps(payload) + b"\n\n"


def comment_frame(text: str) -> bytes:
    # A comment: SDKs and EventSource ignore it (WHATWG SSE §9.2.6).
    return b": " + text.encode() + b"\n\n"


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response (its SSE headers, its chunked body), used
    through public calls only, with two changes.

    No ping task of its own: ``Keepalive`` pings every stream from one
    task. And its hung-peer timeout (aiohttp-sse's send timeout as
    TCP_USER_TIMEOUT) is held here, without reading the old value first.
    """

    last_write = 0.0
    #: When the write in progress began, or last saw its client take bytes
    #: (0.0: no write in progress): a write still going waits for the
    #: client to take the bytes before it.
    writing_since = 0.0
    #: Bytes queued for the client when ``took_bytes`` last looked.
    queued = 0
    #: Closed by ``Keepalive`` for taking nothing for its ``stall_s``.
    stalled = False

    def __init__(self, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(headers=headers, sep="\n", allow_all_methods=True,
                         send_timeout=SEND_TIMEOUT_S)
        self._peer: asyncio.Transport | None = None
        self._timed_socket: socket.socket | None = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        # aiohttp-sse's prepare() minus its ping task. HTTP/1.1 bodies of
        # unknown length are chunked by aiohttp itself. aiohttp calls this
        # again (and write_eof) when the handler returns: setting the
        # timeout again there, only to restore it, cost four syscalls.
        if not self.prepared:
            self._peer = request.transport
            self._hold_hung_peer_timeout(request)
            _drop_connection_idle_timer(request)
            if request.version < HttpVersion11:
                # HTTP/1.0 has no chunked coding: the body ends where the
                # connection does (RFC 9112 §6.3), keep-alive asked or not
                # (aiohttp-sse's headers say keep-alive for every stream).
                self.force_close()
                self.headers["Connection"] = "close"
        return await StreamResponse.prepare(self, request)

    def _hold_hung_peer_timeout(self, request: BaseRequest) -> None:
        """The send timeout as TCP_USER_TIMEOUT for the stream's life: the
        kernel aborts the connection once written bytes go unacknowledged
        that long (or a zero window is probed that long).

        aiohttp-sse reads the old value first, to restore it at the end:
        three socket calls per stream, each a socket object under uvloop
        (~1.5 % of the gateway's CPU per request). The old value is known:
        0, the kernel's default, as nothing else in the gateway sets it
        and each stream restores it. So two calls, and a kept-alive
        connection goes on as before the stream.
        """
        if _TCP_USER_TIMEOUT is None or request.transport is None:
            return
        sock = request.transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(SEND_TIMEOUT_S * 1000))
        self._timed_socket = sock

    async def write_eof(self, data: bytes = b"") -> None:
        self.writing_since = time.monotonic()
        try:
            await super().write_eof(data)
        finally:
            self.writing_since = 0.0
        sock, self._timed_socket = self._timed_socket, None
        if sock is not None and _TCP_USER_TIMEOUT is not None and sock.fileno() >= 0:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, 0)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data``; nothing at all when it is empty (a batch of
        deltas an API has no frame for): silence stays silence."""
        if data:
            self.last_write = self.writing_since = time.monotonic()
            try:
                await super().write(data)
            finally:
                self.writing_since = 0.0

    def took_bytes(self) -> bool:
        """Whether the client took bytes since the last look: what is queued
        for it shrank (a waiting write queues nothing more, and a ping
        writes only to an empty queue)."""
        queued = 0 if self._peer is None else self._peer.get_write_buffer_size()
        took, self.queued = queued < self.queued, queued
        return took

    def end_stalled(self) -> None:
        """Close the connection of a client that takes none of the bytes
        written to it: no frame could tell it anything any more. Its
        handler's write fails (or the handler is cancelled) at once."""
        self.stalled = True
        if self._peer is not None:
            self._peer.abort()

    async def ping(self) -> None:
        """A keepalive ping, unless the client still has bytes to take.

        Never suspends: it writes only when nothing is queued for the
        transport, and aiohttp's drain waits only while the transport is
        paused, which needs a queue over its high-water mark. So one task
        can ping every stream in turn, and a stuck client holds up no one
        (``Keepalive`` ends it; the kernel aborts it too: TCP_USER_TIMEOUT,
        set in prepare).
        """
        transport = self._peer
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return
        try:
            await self.write(PING)
        except (ConnectionResetError, RuntimeError):
            pass  # gone, or the body already ended: its handler sees to it


def _drop_connection_idle_timer(request: BaseRequest) -> None:
    """Cancel the connection's idle timer for the life of a stream.

    aiohttp arms a timer per connection (``keepalive_timeout``) to close one
    that sends no request, and leaves it armed while a request is served:
    for a stream, a loop timer per stream for minutes (~600 bytes of each
    idle stream under uvloop). Its ``keep_alive()`` cancels it (aiohttp's
    websocket response makes the same call, with False) and changes
    nothing else while the handler runs: keep-alive is decided again from
    the response when the handler returns, and the timer armed again then
    for a connection kept alive.
    """
    request.protocol.keep_alive(True)


class Keepalive:
    """SSE pings for every open stream, from one task.

    Two cadences. A stream still waiting for its first token is pinged
    every ``first_token_interval_s``: the only way a proxy in front learns
    that its client has gone is a write that fails, and a TLS client that
    sends close_notify but keeps its socket open looks alive to nginx until
    nginx writes to it. So the ping bounds how long an abandoned request
    keeps its upstream generation running. Once content flows, the
    tokens themselves are those writes, and a stream is pinged only when
    it has been silent a whole ``interval_s`` (PING_INTERVAL_S): every
    quarter interval the task pings each such stream, so a silent stream
    hears a ping after 1 to 1.25 intervals.

    The same sweep ends a stream whose write has waited ``stall_s``
    (STREAM_MAX_LAG_S) for its client to take anything: the actor's lag
    bound sees a reader only while its log grows and takes no joiners, and
    a client that stops reading for good would otherwise hold its stream
    until the kernel gives up on it (TCP_USER_TIMEOUT, 120 s).
    """

    def __init__(
        self,
        interval_s: float,
        first_token_interval_s: float | None = None,
        stall_s: float | None = None,
    ) -> None:
        self.interval_s = interval_s
        #: None or 0: a stream waiting for its first token is pinged like any other.
        self.first_token_interval_s = first_token_interval_s or None
        #: None: a stalled write is left to the kernel's send timeout.
        self.stall_s = stall_s
        self._streams: set[_EventStream] = set()
        self._waiting: set[_EventStream] = set()
        #: Streams writing their last frame: never pinged, but ended if stalled.
        self._closing: set[_EventStream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def waiting(self) -> int:
        """Streams still waiting for their first token."""
        return len(self._waiting)

    def watch(self, stream: _EventStream) -> None:
        self._streams.add(stream)
        if self.first_token_interval_s is not None:
            self._waiting.add(stream)

    def answered(self, stream: _EventStream) -> None:
        """The stream's first token is written: from now on its own writes
        show a gone client, and it is pinged only when silent."""
        self._waiting.discard(stream)

    def forget(self, stream: _EventStream) -> None:
        self._streams.discard(stream)
        self._waiting.discard(stream)

    @contextmanager
    def closing(self, stream: _EventStream) -> Iterator[None]:
        """While a forgotten stream writes its last frame: a client that
        takes none of it is ended like any stalled one."""
        self._closing.add(stream)
        try:
            yield
        finally:
            self._closing.discard(stream)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Keepalive]:
        """The pinging task, for as long as the context (the app's)."""
        task = asyncio.get_running_loop().create_task(self._run(), name="sse-keepalive")
        try:
            yield self
        finally:
            task.cancel()
            # Its end is a cancellation; ours, if we are cancelled, propagates.
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        sweep_every = self.interval_s / 4
        tick = min(sweep_every, self.first_token_interval_s or sweep_every)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + sweep_every
        while True:
            await asyncio.sleep(tick)
            if self._waiting:
                await self.ping_waiting_streams()
            if loop.time() >= next_sweep:
                next_sweep += sweep_every
                self.end_stalled_streams()
                await self.ping_silent_streams()

    async def ping_waiting_streams(self) -> None:
        """Ping every stream still waiting for its first token, on every
        tick: the gap between two pings is then one tick, never two."""
        await self._ping(list(self._waiting))

    async def ping_silent_streams(self) -> None:
        due = time.monotonic() - self.interval_s
        await self._ping([stream for stream in self._streams if stream.last_write <= due])

    def end_stalled_streams(self) -> None:
        """End every stream whose write has waited ``stall_s`` or more for
        its client to take a byte (bytes taken count from each sweep that
        sees them gone)."""
        if self.stall_s is None:
            return
        now = time.monotonic()
        streams = itertools.chain(self._streams, self._closing)
        for stream in [stream for stream in streams if stream.writing_since]:
            if stream.took_bytes():
                stream.writing_since = now
            elif stream.writing_since <= now - self.stall_s:
                log.info("stalled client ended", waited_s=round(now - stream.writing_since, 1))
                stream.end_stalled()

    async def _ping(self, streams: list[_EventStream]) -> None:
        for stream in streams:
            try:
                await stream.ping()
            except Exception:
                # A bug, not a client: say so, and keep pinging the others
                # (one task serves them all; it must not die of one).
                log.exception("keepalive ping failed")


async def open_event_stream(
    request: web.Request, *, keepalive: Keepalive, headers: dict[str, str] | None = None
) -> _EventStream:
    """Send the headers and ``: ping`` at once, before the upstream answers:
    the client (and every proxy and load balancer between) sees bytes now.
    The stream is in ``keepalive``'s care until ``close_event_stream``, or
    until the caller ``forget``s it."""
    response = _EventStream(headers=headers)
    await response.prepare(request)
    await response.write(PING)
    keepalive.watch(response)
    return response


async def close_event_stream(
    response: _EventStream, keepalive: Keepalive, last_frame: bytes = b""
) -> None:
    """No more pings; the last frame and the end of the chunked body leave
    together (a client that takes none of them is ended as stalled)."""
    keepalive.forget(response)
    with keepalive.closing(response):
        await response.write_eof(last_frame)
