"""One HTTP/2 client connection: the asyncio adapter around the protocol core.

Everything the protocol decides is in ``H2ClientProtocol``; this class does
the I/O around it. One read path (``data_received`` -> core events -> stream
callbacks) and one write path (``_flush``: ``transport.write`` of the core's
``data_to_send()``). ``transport.write`` is synchronous, so whatever the core
queues -- an RST_STREAM above all -- is handed to the kernel before the
calling function returns: no lock, no writer task. One loop timer per
connection drives the core's PING liveness.

While the transport's write buffer is above its high-water mark
(``pause_writing`` until ``resume_writing``) the peer is not taking what we
send. The core is told: every frame read may make h2 queue an answer (a
PING or SETTINGS ACK), and a peer that sends such frames without reading
would grow that buffer without bound (RFC 9113 §10.5), so what it queues
meanwhile counts against its limit of unsent acknowledgements. Reading goes
on: a large request body filling the buffer must not stop the tokens of the
connection's other streams. (The bodies themselves are bounded by the
peer's flow-control windows.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from gateway.upstream.base import UpstreamRequest
from gateway.upstream.errors import (
    ConnectionLost,
    ProtocolMismatch,
    TransportError,
    TransportTimeout,
)
from gateway.upstream.h2.events import (
    CapacityChanged,
    ConnectionEnded,
    DataReceived,
    Event,
    HeadReceived,
    Ready,
    StreamEnded,
    StreamFailed,
    WindowOpened,
)
from gateway.upstream.h2.protocol import CONNECTION_WINDOW, H2ClientProtocol
from gateway.upstream.h2.stream import H2ResponseStream


class H2ClientConnection(asyncio.Protocol):
    """Multiplexes ``H2ResponseStream``s over one transport; implements
    ``StreamOwner`` for them."""

    def __init__(
        self,
        *,
        authority: str,
        scheme: str,
        ping_interval: float | None,
        ping_timeout: float,
        max_streams: int | None = None,
        on_capacity: Callable[[], None] = lambda: None,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self._core = H2ClientProtocol(
            authority=authority,
            scheme=scheme,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_streams=max_streams,
            connection_window=connection_window,
        )
        # Called when a stream slot frees up or the connection's state
        # changes, so the pool can hand the slot to the next waiter.
        self._on_capacity = on_capacity
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, H2ResponseStream] = {}
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flush_pending = False
        #: Resolved once the server's preface (its first SETTINGS) has arrived:
        #: only then do we know how many streams it takes (RFC 9113 §3.4).
        self.ready: asyncio.Future[None] = self._loop.create_future()

    # -- state the pool reads -------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        return self._core.is_usable

    @property
    def is_closed(self) -> bool:
        return self._core.is_closed

    @property
    def is_draining(self) -> bool:
        return self._core.is_draining

    @property
    def free_streams(self) -> int:
        return self._core.free_streams

    @property
    def active_streams(self) -> int:
        return self._core.active_streams

    # -- asyncio.Protocol: the read path --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            # Checked before the preface goes out: an HTTP/1.1 server must
            # not see "PRI * HTTP/2.0" (RFC 9113 §3.3).
            negotiated = ssl_object.selected_alpn_protocol()
            mismatch = ProtocolMismatch(
                f"upstream negotiated {negotiated or 'no protocol'} instead of h2", negotiated=negotiated
            )
            self._handle(self._core.lose(mismatch))
            return
        self._core.initiate(self._loop.time())
        self._flush()
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        events = self._core.receive(data, self._loop.time())
        self._flush()
        self._handle(events)

    def pause_writing(self) -> None:
        self._core.pause_sending()

    def resume_writing(self) -> None:
        self._core.resume_sending()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle(self._core.lose(ConnectionLost("upstream connection was lost")))

    def _handle(self, events: list[Event]) -> None:
        capacity = False
        for event in events:
            if isinstance(event, DataReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.on_data(event.data)
            elif isinstance(event, HeadReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.on_head(event.head)
            elif isinstance(event, StreamEnded):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.on_end()
                # A body still being sent stops: the answer is complete.
                self._wake_senders(event.stream_id)
            elif isinstance(event, StreamFailed):
                self._stream_failed(event.stream_id, event.error)
            elif isinstance(event, WindowOpened):
                self._wake_senders(event.stream_id)
            elif isinstance(event, CapacityChanged):
                capacity = True
            elif isinstance(event, Ready):
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(event, ConnectionEnded):
                self._ended(event.error)
                capacity = True
        if capacity:
            self._on_capacity()

    def _stream_failed(self, stream_id: int, error: TransportError) -> None:
        stream = self._streams.pop(stream_id, None)
        # The core marked it closed; its credit goes back now, whatever the
        # consumer does with the failure.
        self._handle(self._core.release(stream_id))
        self._flush_soon()
        self._wake_senders(stream_id)
        if stream is not None:
            stream.on_error(error)

    def _ended(self, error: TransportError | None) -> None:
        self._cancel_timer()
        self._streams.clear()
        self._wake_senders(0)
        if not self.ready.done():
            self.ready.set_exception(error or ConnectionLost("upstream connection was closed"))
            self.ready.exception()  # a failed connect is reported by the pool
        if self._transport is not None:
            self._flush()  # our GOAWAY, if the core queued one
            if error is None:
                self._transport.close()
            else:
                self._transport.abort()

    # -- the write path ---------------------------------------------------------------

    def _flush(self) -> None:
        data = self._core.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _flush_soon(self) -> None:
        """Flush once this loop iteration's callbacks have run: the window
        updates that a loop iteration's reads bring leave in one write
        instead of one each. Requests and resets never wait for this."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._pending_flush)

    def _pending_flush(self) -> None:
        self._flush_pending = False
        self._flush()

    # -- StreamOwner ------------------------------------------------------------------

    def consumed(self, stream_id: int, length: int) -> None:
        if self._core.consumed(stream_id, length):
            self._flush_soon()

    def release(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        events = self._core.release(stream_id)
        self._flush()  # the RST_STREAM leaves now
        self._wake_senders(stream_id)
        self._handle(events)

    # -- sending a request ------------------------------------------------------------

    async def send(self, stream: H2ResponseStream, request: UpstreamRequest, deadline: float) -> None:
        """HEADERS (and the body) for ``request`` as a new stream bound to
        ``stream``; returns once they are written. Each request is written
        as soon as it is opened, also when a burst opens many in one loop
        iteration: the upstream starts on the first while the gateway opens
        the rest. A body waits for send window until ``deadline`` (the
        loop's clock) at most. Raises ``StreamRefused`` if the connection
        takes no new stream: the pool picks another.

        The pool checked ``free_streams`` just before; nothing awaits between
        that check and the HEADERS, so the slot is ours."""
        stream_id = self._core.start_request(request)
        stream.bind(self, stream_id)
        self._streams[stream_id] = stream
        if not request.body:
            self._flush()
            return
        try:
            await self._send_body(stream_id, request.body, deadline)
        except BaseException:
            # Cancelled or timed out half-way: the peer must not wait for the
            # rest of a body that will never come. (A stream that failed is
            # closed already, and a refused one may still be sent again.)
            if stream.error is None:
                stream.reset()
            raise

    async def _send_body(self, stream_id: int, body: bytes, deadline: float) -> None:
        view = memoryview(body)
        while view:
            if not self._core.can_send(stream_id):
                stream = self._streams.get(stream_id)
                error = None if stream is None else stream.error
                if error is not None:
                    raise error
                # The server answered before reading the whole body (an early
                # 413, say), or the stream failed: stop sending; the consumer
                # reads the answer or the failure.
                return
            sent = self._core.send_data(stream_id, view, end_stream=True)
            if sent == 0:
                self._flush()  # what is queued goes out before we wait
                await self._wait_for_window(stream_id, deadline)
                continue
            view = view[sent:]
            self._flush()

    async def _wait_for_window(self, stream_id: int, deadline: float) -> None:
        waiter = self._loop.create_future()
        self._window_waiters[stream_id] = waiter
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError as exc:
            raise TransportTimeout("upstream opened no window for the request body in time") from exc
        finally:
            self._window_waiters.pop(stream_id, None)

    def _wake_senders(self, stream_id: int) -> None:
        if stream_id == 0:
            targets = list(self._window_waiters.values())
        else:
            waiter = self._window_waiters.get(stream_id)
            targets = [] if waiter is None else [waiter]
        for waiter in targets:
            if not waiter.done():
                waiter.set_result(None)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close politely: GOAWAY, then the transport; streams still open fail."""
        self._handle(self._core.close())

    # -- the liveness timer -------------------------------------------------------------

    def _arm_timer(self) -> None:
        when = self._core.next_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        # Frames that came meanwhile moved the core's deadline on; it is read
        # only here, so no frame pays for a timer.
        self._timer = None
        events = self._core.on_timer(self._loop.time())
        self._flush()
        self._handle(events)
        if not self._core.is_closed:
            self._arm_timer()
