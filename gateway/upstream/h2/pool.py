"""A pool of HTTP/2 connections to one origin.

Streams go to the usable connection carrying the fewest, up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS on each (RFC 9113 §6.5.2). While every
connection carries a stream and fewer than ``max_connections`` serve, one
more is opened in the background, so streams spread over the connections
and losing one connection does not fail every stream. When no slot is free
anywhere, openers wait, woken in arrival order (a woken opener can still
lose the slot to a newcomer and waits again). While a connection that takes
streams exists, an opener waiting for a slot takes whichever comes first, a
slot freed there or a new connection; a new connection that fails is then no
failure of the request, which waits on until its slot deadline. Only when no
connection could ever serve it does a failed connect fail the request.

A connection that received GOAWAY, or has opened
``max_streams_per_connection`` streams, takes no new stream and does not
count against ``max_connections`` while it finishes the streams it has. The
cap keeps the client below the per-connection request limit of servers that
end a connection abruptly when it is reached: hypercorn, at 1,000 requests,
sends GOAWAY with its h2 state machine closed and drops the responses still
in flight. A stream
it refused (above the GOAWAY's last-stream-id, §6.8), or that the peer
refused with REFUSED_STREAM (§8.7), is sent again here, on a connection
that takes it: the consumer of the stream does not see the refusal.

The pool owns two timeouts: connecting (TCP, TLS and the peer's preface)
and waiting to get a request on the wire (a stream slot, and send window
for its body). Everything after that is timed by the caller.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from gateway.upstream.base import UpstreamRequest
from gateway.upstream.errors import (
    ConnectFailed,
    ConnectionLost,
    StreamRefused,
    StreamReset,
    TransportError,
    TransportTimeout,
)
from gateway.upstream.h2.connection import H2ClientConnection
from gateway.upstream.h2.stream import MAX_SENDS, H2ResponseStream
from gateway.upstream.origin import Origin

#: After a connection attempt failed, no extra connection is opened for this
#: long, to spread streams or for an opener that an existing connection can
#: serve once a slot frees (streams still go where a slot is free).
_SPREAD_BACKOFF_S = 1.0


class H2Pool:
    """Implements ``gateway.upstream.base.Transport`` over HTTP/2; implements
    ``Resender`` for its streams."""

    def __init__(
        self,
        origin: Origin,
        *,
        max_connections: int,
        connect_timeout: float,
        slot_timeout: float,
        ping_interval: float | None,
        ping_timeout: float,
        max_streams_per_connection: int | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if origin.is_tls and ssl_context is None:
            raise ValueError("an https origin needs an SSL context offering h2")
        self._origin = origin
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._slot_timeout = slot_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_streams_per_connection = max_streams_per_connection
        self._ssl_context = ssl_context if origin.is_tls else None
        self._connections: list[H2ClientConnection] = []
        self._connecting: asyncio.Task[H2ClientConnection] | None = None
        self._connect_failed_at = -_SPREAD_BACKOFF_S
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def connection_count(self) -> int:
        return len(self._connections)

    async def open(self, request: UpstreamRequest) -> H2ResponseStream:
        """Send ``request``; return its stream once it is on the wire."""
        stream = H2ResponseStream(request, self)
        await self._send(stream)
        return stream

    async def resend(self, stream: H2ResponseStream) -> None:
        await self._send(stream)

    async def _send(self, stream: H2ResponseStream) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._slot_timeout
        while True:
            connection = None if self._closed else self._pick()
            if connection is None:
                # With a slot free there is no timeout context at all.
                try:
                    async with asyncio.timeout_at(deadline):
                        connection = await self._wait_for_slot()
                except TimeoutError as exc:
                    raise TransportTimeout("no upstream stream slot came free in time") from exc
            if stream.is_reset:
                # Reset while it waited to be sent again: nothing to send.
                raise StreamReset("stream was reset by the gateway")
            try:
                # No await between picking the connection and its HEADERS:
                # the slot is ours.
                await connection.send(stream, stream.request, deadline)
                return
            except StreamRefused:
                # This connection stopped taking streams meanwhile, or refused
                # this one while its body was going out: another will take it.
                if not (stream.error is None or stream.may_resend):
                    raise

    async def _wait_for_slot(self) -> H2ClientConnection:
        turned_away = 0
        while True:
            if self._closed:
                raise ConnectionLost("the upstream pool is closed")
            connection = self._pick()
            if connection is not None:
                return connection
            if any(c.is_usable for c in self._connections):
                # A connection that takes streams will free a slot as its
                # streams end: wait for that or for a new connection,
                # whichever comes first (the end of a connect, failed or
                # not, wakes the waiters). A connect that fails leaves the
                # wait going until the slot deadline, and for a while after
                # a failure no other connect is tried for it, as for
                # spreading streams: a server at its connection limit turns
                # each new one away.
                if self._connecting is None and self._can_add_connection() and not self._backing_off():
                    self._connect()
                await self._wait_for_capacity()
            elif self._connecting is not None or self._can_add_connection():
                # Nothing else could ever serve: the new connection's
                # failure is the request's.
                connection = await asyncio.shield(self._connect())
                if connection.is_closed:
                    # Ended by the peer before it took a stream (a GOAWAY
                    # with its preface, RFC 9113 §6.8): the request was not
                    # sent, so a new connection may take it, as many times
                    # as a refused request is sent, not for as long as a
                    # peer turns every connection away.
                    turned_away += 1
                    if turned_away >= MAX_SENDS:
                        raise ConnectionLost("upstream closed each new connection before it took a stream")
            else:
                await self._wait_for_capacity()

    def _can_add_connection(self) -> bool:
        # A connection draining after GOAWAY still finishes its streams but
        # takes no new ones: it does not count against the limit.
        serving = sum(1 for c in self._connections if not c.is_draining)
        return serving < self._max_connections

    def _pick(self) -> H2ClientConnection | None:
        """The usable connection with a free slot carrying fewest streams;
        opens one more in the background when every one carries some."""
        best: H2ClientConnection | None = None
        for connection in self._connections:
            if connection.is_usable and connection.free_streams > 0 and (
                best is None or connection.active_streams < best.active_streams
            ):
                best = connection
        if (
            best is not None
            and best.active_streams > 0
            and self._connecting is None
            and self._can_add_connection()
            and not self._backing_off()
        ):
            self._connect()
        return best

    def _backing_off(self) -> bool:
        """A connection attempt failed less than _SPREAD_BACKOFF_S ago."""
        return asyncio.get_running_loop().time() - self._connect_failed_at < _SPREAD_BACKOFF_S

    def _connect(self) -> asyncio.Task[H2ClientConnection]:
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._establish(), name="h2-connect")
            self._connecting.add_done_callback(self._connect_done)
        return self._connecting

    def _connect_done(self, task: asyncio.Task[H2ClientConnection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so a connect nobody waits for (one opened to
            # spread streams) does not log "exception was never retrieved";
            # waiters get it anyway.
            self._connect_failed_at = asyncio.get_running_loop().time()
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
            raise TransportTimeout(f"connecting to {origin.authority} timed out") from exc
        except TransportError:
            raise
        except OSError as exc:  # ssl.SSLError included
            raise ConnectFailed(f"cannot connect to {origin.authority}: {exc}") from exc
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        if self._closed:
            connection.close()
            raise ConnectionLost("the upstream pool is closed")
        if connection.is_closed:
            # The peer ended it in the read that brought its preface (its
            # SETTINGS and a GOAWAY in one write): added now, it would stay
            # in the pool, closed, counted against max_connections, and never
            # removed. Whoever waits for it looks again; no connection is
            # opened just to spread streams for a while, as after a failure.
            self._connect_failed_at = asyncio.get_running_loop().time()
            return connection
        self._connections.append(connection)
        return connection

    def _new_connection(self) -> H2ClientConnection:
        return H2ClientConnection(
            authority=self._origin.authority,
            scheme=self._origin.scheme,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            max_streams=self._max_streams_per_connection,
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
        """A connection freed a slot, changed its settings, or ended."""
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
