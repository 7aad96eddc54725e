"""Server-sent events: framing, the early ping, keepalive.

Frames are built as bytes once and written whole (one ``write`` per frame, so
a keepalive ping can never land inside one). The response is aiohttp-sse's
``EventSourceResponse``: it sets the SSE headers (``Cache-Control: no-cache``,
``X-Accel-Buffering: no`` for nginx) and has the kernel abort a peer that
stops acknowledging (TCP_USER_TIMEOUT). Its per-response ping task is not
used: one ``Keepalive`` task pings every open stream (a task per stream cost
~1.1 KiB of each idle stream, tests/perf/PROFILES.md).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import BaseRequest, StreamResponse
from aiohttp_sse import EventSourceResponse

from gateway import json_codec

log = structlog.get_logger("gateway")

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"

_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only


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
    """aiohttp-sse's response, with three changes.

    The status line and headers wait for the first write -- the ping, right
    after -- so both leave in one packet (aiohttp's own Response does the
    same). No ping task of its own: ``Keepalive`` pings it when it has
    been silent for a whole interval. And its hung-peer timeout is set
    without reading the old value first.
    """

    _send_headers_immediately = False
    last_write = 0.0

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        # aiohttp-sse's prepare() minus its ping task. HTTP/1.1 bodies of
        # unknown length are chunked by aiohttp itself. aiohttp calls this
        # again (and write_eof) when the handler returns: setting the
        # timeout again there, only to restore it, cost four syscalls.
        if not self.prepared:
            self._hold_hung_peer_timeout(request)
            _drop_connection_idle_timer(request)
        return await StreamResponse.prepare(self, request)

    def _hold_hung_peer_timeout(self, request: BaseRequest) -> None:
        """aiohttp-sse's send timeout as TCP_USER_TIMEOUT for the stream's
        life: the kernel aborts the connection once written bytes go
        unacknowledged that long (or a zero window is probed that long).

        aiohttp-sse reads the old value first, to restore it at the end:
        three socket calls per stream, each a socket object under uvloop
        (~1.5 % of the gateway's CPU per request). The old value is known:
        0, the kernel's default, as nothing else in the gateway sets it
        and each stream restores it. So two calls; aiohttp-sse's
        ``write_eof`` restores what is saved here, and a kept-alive
        connection goes on as before the stream.
        """
        if self._send_timeout is None or _TCP_USER_TIMEOUT is None or request.transport is None:
            return
        sock = request.transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self._send_timeout * 1000))
        self._tcp_sock, self._saved_tcp_user_timeout = sock, 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.last_write = time.monotonic()
        await super().write(data)

    async def ping(self) -> None:
        """A keepalive ping, unless the client still has bytes to take.

        Never suspends: it writes only when nothing is queued for the
        transport, and aiohttp's drain waits only while the transport is
        paused, which needs a queue over its high-water mark. So one task
        can ping every stream in turn, and a stuck client holds up no one
        (the kernel aborts it: TCP_USER_TIMEOUT, set in prepare).
        """
        transport = self._req.transport if self._req is not None else None
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
    idle stream under uvloop, tests/perf/PROFILES.md item 21). Its
    ``keep_alive()`` cancels it (aiohttp's websocket response makes the
    same call, with False) and changes nothing else while the handler
    runs: keep-alive is decided again from the response when the handler
    returns, and the timer armed again then for a connection kept alive.
    """
    request.protocol.keep_alive(True)


class Keepalive:
    """SSE keepalive for every open stream, from one task.

    Every quarter interval the task pings each stream silent for a whole
    interval (ARCHITECTURE: "again every PING_INTERVAL_S while nothing else
    was sent"), so a silent stream hears a ping after 1 to 1.25 intervals.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._streams: set[_EventStream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def watch(self, stream: _EventStream) -> None:
        self._streams.add(stream)

    def forget(self, stream: _EventStream) -> None:
        self._streams.discard(stream)

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
        while True:
            await asyncio.sleep(self.interval_s / 4)
            await self.ping_silent_streams()

    async def ping_silent_streams(self) -> None:
        due = time.monotonic() - self.interval_s
        for stream in [stream for stream in self._streams if stream.last_write <= due]:
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
    response = _EventStream(headers=headers, sep="\n", allow_all_methods=True)
    await response.prepare(request)
    await response.write(PING)
    keepalive.watch(response)
    return response


async def close_event_stream(
    response: _EventStream, keepalive: Keepalive, last_frame: bytes = b""
) -> None:
    """No more pings; the last frame and the end of the chunked body leave
    together."""
    keepalive.forget(response)
    await response.write_eof(last_frame)
