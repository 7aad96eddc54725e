"""A pool of HTTP/2 connections to one origin.

Streams fill a connection up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS
(RFC 9113 §6.5.2), then another connection is opened, up to
``max_connections``; beyond that, openers wait for a slot, woken in arrival
order (a woken opener can still lose the slot to a newcomer and waits again).
Connecting runs in a task the pool owns, shared by everyone who needs the
connection, so a caller that gives up does not abort it for the others.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from gateway.errors import (
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.h2.connection import H2ClientConnection
from gateway.upstream.h2.stream import H2ResponseStream
from gateway.upstream.origin import Origin


class H2Pool:
    """Implements ``gateway.upstream.base.Transport`` over HTTP/2."""

    def __init__(
        self,
        origin: Origin,
        *,
        max_connections: int = 4,
        connect_timeout: float = 5.0,
        first_byte_timeout: float | None = 60.0,
        idle_timeout: float | None = 30.0,
        keepalive_s: float | None = 20.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if origin.is_tls and ssl_context is None:
            raise ValueError("an https origin needs an SSL context offering h2")
        self._origin = origin
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self._keepalive_s = keepalive_s
        self._ssl_context = ssl_context if origin.is_tls else None
        self._connections: list[H2ClientConnection] = []
        self._connecting: asyncio.Task[H2ClientConnection] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Every stream's first-byte deadline, on one loop timer.
        self._deadlines = Deadlines()
        self._closed = False

    def connection_count(self) -> int:
        return len(self._connections)

    async def open(self, request: UpstreamRequest) -> H2ResponseStream:
        # Waiting for a stream slot and for window to send the body are part
        # of the time to the first byte: one deadline bounds them, and then
        # the stream's head and first DATA (H2ResponseStream).
        timeout = self._first_byte_timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        connection = None if self._closed else self._pick()
        if connection is None:
            # With a slot free there is no timeout context at all (~1.5 %
            # of the CPU of a request).
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._wait_for_slot()
            except TimeoutError as exc:
                raise UpstreamTimeout("no upstream stream slot came free in time") from exc
        # No await between picking the connection and send_headers: the slot
        # is ours.
        return await connection.open_stream(request, deadline)

    async def _wait_for_slot(self) -> H2ClientConnection:
        while True:
            if self._closed:
                raise UpstreamConnectionLost("the upstream pool is closed")
            connection = self._pick()
            if connection is not None:
                return connection
            if self._connecting is not None or self._can_add_connection():
                await asyncio.shield(self._connect())
            else:
                await self._wait_for_capacity()

    def _can_add_connection(self) -> bool:
        # A connection draining after GOAWAY still finishes its streams but
        # takes no new ones: it does not count against the limit.
        serving = sum(1 for c in self._connections if not c.is_draining)
        return serving < self._max_connections

    def _pick(self) -> H2ClientConnection | None:
        # Fill the oldest connection first: fewer connections, fuller frames.
        for connection in self._connections:
            if connection.is_usable and connection.free_streams > 0:
                return connection
        return None

    def _connect(self) -> asyncio.Task[H2ClientConnection]:
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._establish(), name="h2-connect")
            self._connecting.add_done_callback(self._connect_done)
        return self._connecting

    def _connect_done(self, task: asyncio.Task[H2ClientConnection]) -> None:
        self._connecting = None
        if not task.cancelled():
            # Retrieved here so a connect that nobody waits for any more does
            # not log "exception was never retrieved"; waiters get it anyway.
            task.exception()
        self._wake_waiters()

    async def _establish(self) -> H2ClientConnection:
        loop = asyncio.get_running_loop()
        origin = self._origin
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                raw_transport, connection = await loop.create_connection(
                    self._new_connection,
                    origin.host,
                    origin.port,
                    ssl=self._ssl_context,
                    server_hostname=origin.host if self._ssl_context else None,
                )
                transport = raw_transport
                await connection.ready
        except TimeoutError as exc:
            if transport is not None:
                transport.abort()
            raise UpstreamTimeout(f"connecting to {origin.authority} timed out") from exc
        except UpstreamError:
            raise
        except OSError as exc:  # ssl.SSLError included
            raise UpstreamConnectError(f"cannot connect to {origin.authority}: {exc}") from exc
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        if self._closed:
            connection.close()
            raise UpstreamConnectionLost("the upstream pool is closed")
        self._connections.append(connection)
        return connection

    def _new_connection(self) -> H2ClientConnection:
        return H2ClientConnection(
            authority=self._origin.authority,
            scheme=self._origin.scheme,
            idle_timeout=self._idle_timeout,
            deadlines=self._deadlines,
            keepalive_s=self._keepalive_s,
            on_capacity=self._on_capacity,
        )

    async def _wait_for_capacity(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Woken for a slot, then cancelled before taking it: pass
                # the wake-up on, or the slot waits for the next event.
                self._waiters.remove(waiter)
                self._wake_waiters()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _on_capacity(self) -> None:
        """A connection freed a slot, changed its settings, or died."""
        self._connections = [c for c in self._connections if not c.is_closed]
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        free = sum(c.free_streams for c in self._connections if c.is_usable)
        if self._can_add_connection() and self._connecting is None:
            free += 1  # the first one woken opens a new connection
        for waiter in list(self._waiters):
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            try:
                await self._connecting
            except (asyncio.CancelledError, Exception):
                # Ours was cancelled by us just above; anything else was
                # already reported to its waiters.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._deadlines.close()
