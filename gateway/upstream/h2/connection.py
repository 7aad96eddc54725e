"""One HTTP/2 client connection: an ``asyncio.Protocol`` around h2's state machine.

One read path (``data_received`` -> h2 events -> stream callbacks) and one write
path (``_flush``: ``transport.write(h2.data_to_send())``). ``transport.write``
is synchronous, so anything the state machine queues -- an RST_STREAM above
all -- is handed to the kernel before the calling function returns; no lock,
no writer task. This connection is the single owner of its ``H2Connection``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Final, cast

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from gateway.errors import (
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamProtocolMismatch,
    UpstreamStreamRefused,
    UpstreamTimeout,
)
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.h2.h2_state import code_name, new_client_state_machine, reset_error, response_head
from gateway.upstream.h2.stream import H2ResponseStream

#: Our connection-level receive window. The stream windows stay at the default
#: 65,535 bytes so one stalled stream buffers little, but the connection window
#: must be large enough that a few stalled streams cannot starve the others
#: (RFC 9113 §5.2: both windows apply to every DATA frame).
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
_DEFAULT_WINDOW: Final = 65_535

#: What a reader consumes is credited to h2 in batches of this much per
#: stream rather than at every read: h2's bookkeeping per call was ~4 % of the
#: gateway's CPU per relayed chunk. Flow control stays live (RFC 9113 §6.9):
#: h2 sends a WINDOW_UPDATE once half a window is credited, so a stream's peer
#: keeps at least 65,535 - 32,767 - ACK_BATCH_BYTES of window while its reader
#: keeps up.
ACK_BATCH_BYTES: Final = 8192
#: The connection window is shared, and unread streams can hold most of it:
#: once what all streams owe together reaches this, or the peer's connection
#: window falls below it, everything owed is credited at every read, as
#: before batching. h2 then sends its update at half a window credited, or,
#: should the window reach 0, at the next credit of over 1 KiB.
_OWED_LIMIT: Final = CONNECTION_WINDOW // 4


class H2ClientConnection(asyncio.Protocol):
    """Multiplexes ``H2ResponseStream``s over one transport."""

    def __init__(
        self,
        *,
        authority: str,
        scheme: str,
        idle_timeout: float | None,
        deadlines: Deadlines,
        keepalive_s: float | None = 20.0,
        on_capacity: Callable[[], None] = lambda: None,
    ) -> None:
        self._h2 = new_client_state_machine()
        self._authority = authority.encode()
        self._scheme = scheme.encode()
        self._idle_timeout = idle_timeout
        self._deadlines = deadlines
        self._keepalive_s = keepalive_s
        # Called when a stream slot frees up or the connection's state changes,
        # so the pool can hand the slot to the next waiter.
        self._on_capacity = on_capacity
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, H2ResponseStream] = {}
        self._window_waiters: dict[int, asyncio.Future[None]] = {}
        # Bytes read but not yet credited, per stream, and their sum.
        self._owed: dict[int, int] = {}
        self._owed_total = 0
        self._goaway = False
        self._closed = False
        loop = asyncio.get_running_loop()
        #: Resolved once the server's preface (its first SETTINGS) has arrived:
        #: only then do we know how many streams it takes (RFC 9113 §3.4).
        self.ready: asyncio.Future[None] = loop.create_future()
        self._ping_ids = itertools.count(1)
        self._ping_outstanding = False
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._flush_pending = False

    # -- state the pool reads ---------------------------------------------------

    @property
    def is_usable(self) -> bool:
        """Takes new streams: alive, ready, and no GOAWAY received."""
        return self.ready.done() and not (self._closed or self._goaway)

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_draining(self) -> bool:
        """Alive, but finishing its streams after a GOAWAY: takes no new ones."""
        return self._goaway and not self._closed

    @property
    def free_streams(self) -> int:
        return max(0, self._h2.remote_settings.max_concurrent_streams - len(self._streams))

    # -- asyncio.Protocol: the read path ----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            # Check before the preface goes out: an HTTP/1.1 server must not
            # see "PRI * HTTP/2.0" (RFC 9113 §3.3).
            negotiated = ssl_object.selected_alpn_protocol()
            self._fail(
                UpstreamProtocolMismatch(
                    f"upstream negotiated {negotiated or 'no protocol'} instead of h2",
                    negotiated=negotiated,
                )
            )
            return
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self._flush()
        self._schedule_keepalive()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(UpstreamProtocolError(f"HTTP/2 protocol error from upstream: {exc}"))
            return
        # Any frame proves the peer alive: the keepalive PING is for silence.
        self._ping_outstanding = False
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamConnectionLost("upstream connection was lost"))

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.flow_controlled_length is not None
            stream = self._streams.get(event.stream_id)
            if stream is None:
                # A stream we already reset or finished: h2 keeps the frame
                # in its accounting, so we must still return the credit.
                self.acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                stream.on_data(event.data or b"", event.flow_controlled_length)
        elif isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.on_head(response_head(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._end_stream(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self._fail_stream(event.stream_id, reset_error(event.error_code))
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake_senders(event.stream_id or 0)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_senders(0)  # INITIAL_WINDOW_SIZE may have grown
            self._on_capacity()  # MAX_CONCURRENT_STREAMS may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event.last_stream_id or 0, event.error_code)
        # StreamEnded also follows a DATA or HEADERS frame that carried
        # END_STREAM, as its own event. PingAckReceived: the liveness flag
        # was cleared above. PING itself is
        # answered by h2; TrailersReceived, SettingsAcknowledged and others
        # need nothing from a client that only relays the body.

    # -- the write path -----------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _flush_soon(self) -> None:
        """Flush once this loop iteration's callbacks have run: the window
        updates that credit for read data brings and the requests a burst
        opens leave in one write instead of one each. Resets never wait for
        this: they flush at once."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._pending_flush)

    def _flush_request(self) -> None:
        """A request's frames: the first request of a loop iteration leaves
        at once (TTFT: it does not wait for the iteration to end); the rest
        of a burst opened in the same iteration joins the flush queued here.
        Two writes for a burst instead of one each."""
        if not self._flush_pending:
            self._flush()
            self._flush_soon()

    def _pending_flush(self) -> None:
        self._flush_pending = False
        self._flush()

    # -- used by streams (synchronous) --------------------------------------------

    def consumed(self, stream_id: int, length: int) -> None:
        """A reader took ``length`` more bytes of the stream: credit them to
        the peer's windows, a batch at a time (``ACK_BATCH_BYTES``)."""
        if self._closed or length == 0:
            return
        owed = self._owed.get(stream_id, 0) + length
        self._owed_total += length
        window_left = self._owed_total < _OWED_LIMIT and (
            self._h2.inbound_flow_control_window >= _OWED_LIMIT
        )
        if owed < ACK_BATCH_BYTES and window_left:
            self._owed[stream_id] = owed
        elif window_left:
            self._owed.pop(stream_id, None)
            self._owed_total -= owed
            self._credit(stream_id, owed)
        else:
            self._owed[stream_id] = owed
            owed_by_stream, self._owed, self._owed_total = self._owed, {}, 0
            for owing_stream_id, amount in owed_by_stream.items():
                self._credit(owing_stream_id, amount)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """Credit ``length`` bytes now, with whatever the stream still owes:
        for a stream that is done (ended, reset, failed) or never read."""
        if self._closed:
            return
        owed = self._owed.pop(stream_id, 0)
        self._owed_total -= owed
        if owed + length:
            self._credit(stream_id, owed + length)

    def _credit(self, stream_id: int, length: int) -> None:
        self._h2.acknowledge_received_data(length, stream_id)
        self._flush_soon()

    def reset_stream(self, stream_id: int) -> None:
        """RST_STREAM(CANCEL), written before returning (RFC 9113 §6.4, §8.7)."""
        if self._streams.pop(stream_id, None) is None or self._closed:
            return
        try:
            self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass  # closed in the same batch of frames: nothing to cancel
        self._flush()
        self._stream_slot_freed(stream_id)

    # -- opening streams ----------------------------------------------------------

    async def open_stream(self, request: UpstreamRequest, deadline: float | None) -> H2ResponseStream:
        """Send a request; return once HEADERS (and the body) are written or
        queued: the first request of a loop iteration leaves at once, the
        others opened in it together at its end (``_flush_request``).
        ``deadline`` (the loop's clock) is the request's first-byte one: a
        body that must wait for window waits until then at most, and the
        stream's head and first DATA must come by then.

        The caller (the pool) checked ``free_streams`` just before; nothing
        awaits between that check and ``send_headers``, so the slot is ours.
        """
        if not self.is_usable:
            raise UpstreamStreamRefused("connection no longer takes new streams")
        stream_id = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", request.method.encode()),
            (b":scheme", self._scheme),
            (b":authority", self._authority),
            (b":path", request.path.encode()),
        ]
        headers.extend((name.encode(), value.encode()) for name, value in request.headers)
        if request.body:
            headers.append((b"content-length", str(len(request.body)).encode()))
        stream = H2ResponseStream(
            self,
            stream_id,
            first_byte_deadline=deadline,
            idle_timeout=self._idle_timeout,
            deadlines=self._deadlines,
        )
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not request.body)
        except h2.exceptions.ProtocolError as exc:
            # Stream ids exhausted (2^31, RFC 9113 §5.1.1) or the peer's
            # limit reached: this connection takes no more; another will.
            self._goaway = True
            self._on_capacity()
            stream.release()  # never opened: stop its first-byte timer
            raise UpstreamStreamRefused(f"connection cannot open a stream: {exc}") from exc
        self._streams[stream_id] = stream
        if not request.body:
            self._flush_request()
        else:
            try:
                await self._send_body(stream, request.body, deadline)
            except BaseException:
                # Cancelled (or failed) half-way: the peer must not wait for
                # the rest of a body that will never come.
                stream.reset()
                raise
        return stream

    async def _send_body(self, stream: H2ResponseStream, body: bytes, deadline: float | None) -> None:
        """DATA frames within the peer's windows (RFC 9113 §6.9.1)."""
        stream_id = stream.stream_id
        view = memoryview(body)
        while view:
            if stream_id not in self._streams:
                if stream.error is not None:
                    raise stream.error  # refused streams keep their retryable error
                # The server answered before reading the whole body (an early
                # 413, say): stop sending and let the caller read the answer.
                return
            window = min(
                self._h2.local_flow_control_window(stream_id),
                self._h2.max_outbound_frame_size,
            )
            if window <= 0:
                self._flush()  # what is queued goes out before we wait
                await self._wait_for_window(stream_id, deadline)
                continue
            piece, view = view[:window], view[window:]
            self._h2.send_data(stream_id, piece.tobytes(), end_stream=not view)
            self._flush_request()

    async def _wait_for_window(self, stream_id: int, deadline: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._window_waiters[stream_id] = waiter
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream opened no window for the request body in time") from exc
        finally:
            self._window_waiters.pop(stream_id, None)

    def _wake_senders(self, stream_id: int) -> None:
        targets = list(self._window_waiters.values()) if stream_id == 0 else [
            w for w in (self._window_waiters.get(stream_id),) if w is not None
        ]
        for waiter in targets:
            if not waiter.done():
                waiter.set_result(None)

    # -- endings --------------------------------------------------------------------

    def _end_stream(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.on_end()
            self._stream_slot_freed(stream_id)

    def _fail_stream(self, stream_id: int, exc: UpstreamError) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.on_error(exc)
            self._stream_slot_freed(stream_id)

    def _stream_slot_freed(self, stream_id: int) -> None:
        # A body sender waiting for window on this stream must look again:
        # the stream it feeds is gone.
        self._wake_senders(stream_id)
        if self._goaway and not self._streams:
            self.close()
        self._on_capacity()

    def _on_goaway(self, last_stream_id: int, error_code: int | None) -> None:
        """RFC 9113 §6.8: streams above ``last_stream_id`` were never processed
        and may be retried elsewhere; those at or below it run to completion."""
        self._goaway = True
        refused = UpstreamStreamRefused("upstream sent GOAWAY before processing the stream")
        for stream_id in [sid for sid in self._streams if sid > last_stream_id]:
            self._fail_stream(stream_id, refused)
        if error_code not in (None, ErrorCodes.NO_ERROR):
            # A GOAWAY with an error closes the connection for everyone.
            self._fail(UpstreamConnectionLost(f"upstream sent GOAWAY ({code_name(error_code)})"))
            return
        if not self._streams:
            self.close()
        self._on_capacity()

    def _fail(self, exc: UpstreamError) -> None:
        """The connection is gone: fail every stream, release everything."""
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # a failed connect is reported by the pool
        if self._closed:
            return
        self._closed = True
        self._cancel_keepalive()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.on_error(exc)
        self._wake_senders(0)
        if self._transport is not None:
            self._transport.abort()
        self._on_capacity()

    def close(self) -> None:
        """Close politely: GOAWAY, then the transport; streams still open fail."""
        if self._closed:
            return
        try:
            self._h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass  # the state machine is already closed: just drop the socket
        streams = self._streams
        self._streams = {}
        self._closed = True
        self._cancel_keepalive()
        closed = UpstreamConnectionLost("upstream connection was closed")
        for stream in streams.values():
            stream.on_error(closed)
        self._wake_senders(0)
        if self._transport is not None:
            self._transport.close()
        if not self.ready.done():
            self.ready.cancel()
        self._on_capacity()

    # -- keepalive ------------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        if self._keepalive_s:
            loop = asyncio.get_running_loop()
            self._keepalive_timer = loop.call_later(self._keepalive_s, self._keepalive)

    def _cancel_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _keepalive(self) -> None:
        """A PING every interval (RFC 9113 §6.7); a whole interval of silence
        after one means the path is dead, and streams waiting on it should
        fail now rather than at the idle timeout."""
        if self._closed:
            return
        if self._ping_outstanding:
            self._fail(UpstreamConnectionLost("upstream did not answer a keepalive PING"))
            return
        self._ping_outstanding = True
        self._h2.ping(next(self._ping_ids).to_bytes(8, "big"))
        self._flush()
        self._schedule_keepalive()
