"""The HTTP/2 front end: one ``asyncio.Protocol`` around an ``H2Connection``.

Sans-IO in the h2 style: one read path (``data_received`` -> h2 events ->
handlers) and one write path (``_flush``: whatever h2 queued goes to the
transport). Each request runs as a task owned by this connection; connection
loss cancels them, and ``wait_closed`` awaits them.

Sends honour both windows (RFC 9113 §5.2) and the transport's backpressure.
Writes from request tasks are flushed once per loop iteration: thousands of
streams ticking together make a few ``send()`` syscalls, not thousands.
Peer departures are timed in the callbacks themselves (``StreamReset``,
``connection_lost``), not when the cancelled task gets to run: cancel latency
is measured against that moment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from gateway.sim.app import SimApp
from gateway.sim.formats import error_body
from gateway.sim.log import Outcome, Record
from gateway.sim.sink import Headers, PeerGone, SimRequest

logger = logging.getLogger(__name__)

#: The client connection preface (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_WINDOW_SETTINGS = (h2.settings.SettingCodes.INITIAL_WINDOW_SIZE, h2.settings.SettingCodes.MAX_FRAME_SIZE)


class H2Stream:
    """One request/response exchange; the ``ResponseSink`` of its task."""

    __slots__ = ("stream_id", "headers", "body", "task", "record", "window_open", "_connection")

    def __init__(
        self, connection: H2ServerProtocol, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.record: Record | None = None
        #: Set whenever flow-control credit may have grown.
        self.window_open = asyncio.Event()

    @property
    def http_version(self) -> str:
        return "HTTP/2"

    @property
    def connection_id(self) -> int:
        return self._connection.connection_id

    def track(self, record: Record) -> None:
        self.record = record

    async def send_head(self, status: int, headers: Headers, *, content_length: int | None = None) -> None:
        self._connection.send_head(self, status, headers, content_length)

    async def send(self, data: bytes) -> None:
        await self._connection.send_data(self, data, end_stream=False)

    async def finish(self, data: bytes = b"") -> None:
        await self._connection.send_data(self, data, end_stream=True)

    def reset(self) -> None:
        self._connection.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)

    def kill(self) -> None:
        self._connection.abort()

    def goaway(self, *, refuse: bool) -> None:
        self._connection.goaway(self, refuse=refuse)

    def request(self) -> SimRequest:
        method = target = ""
        fields: dict[str, str] = {}
        for name, value in self.headers:
            if name == b":method":
                method = value.decode("ascii")
            elif name == b":path":
                target = value.decode("ascii")
            elif not name.startswith(b":"):
                fields[name.decode("latin-1")] = value.decode("latin-1")
        return SimRequest.from_target(method, target, fields, bytes(self.body))


class H2ServerProtocol(asyncio.Protocol):
    def __init__(
        self, app: SimApp, connection_id: int, *, on_closed: Callable[[H2ServerProtocol], None]
    ) -> None:
        self._app = app
        self.connection_id = connection_id
        self._on_closed = on_closed
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._conn = h2.connection.H2Connection(config=config)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, H2Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writable = asyncio.Event()
        self._writable.set()
        self._flush_scheduled = False
        self._lost = False
        self._closed = asyncio.Event()
        #: The last_stream_id of the GOAWAY we sent, if we did.
        self._goaway_last: int | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        profile = self._app.profile
        # Announced in our first SETTINGS so a client opening many streams
        # at once sees the limit (h2's own default is 100).
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: profile.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._conn.initiate_connection()
        if profile.initial_window_size != 65535:
            # A separate SETTINGS: a smaller window only binds the client once
            # it has acknowledged it (RFC 9113 §6.9.2).
            self._conn.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: profile.initial_window_size}
            )
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 has queued a GOAWAY naming the error (RFC 9113 §5.4.1).
            self._flush()
            self._close_transport()
            return
        for event in events:
            match event:
                case h2.events.RequestReceived():
                    self._on_request(event)
                case h2.events.DataReceived():
                    self._on_data(event)
                case h2.events.StreamEnded():
                    self._on_stream_ended(event)
                case h2.events.StreamReset():
                    self._on_stream_reset(event)
                case h2.events.WindowUpdated():
                    self._on_window_updated(event)
                case h2.events.RemoteSettingsChanged():
                    if any(code in event.changed_settings for code in _WINDOW_SETTINGS):
                        self._wake_all()
                case h2.events.ConnectionTerminated():
                    # h2 sends nothing after a peer's GOAWAY, so the streams
                    # cannot be finished: they end here, and so does the
                    # connection.
                    self._drop_streams("disconnect", time.monotonic())
                    self._close_transport()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        at = time.monotonic()
        self._lost = True
        self._drop_streams("disconnect", at)
        self._writable.set()  # wake writers: they find the connection gone
        self._check_closed()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- events ---------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None and event.headers is not None
        if self._goaway_last is not None and stream_id > self._goaway_last:
            # Above our GOAWAY's last_stream_id: never processed, the client
            # may retry it elsewhere (RFC 9113 §6.8).
            self._conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers = [(bytes(name), bytes(value)) for name, value in event.headers]
        self._streams[stream_id] = H2Stream(self, stream_id, headers)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None and event.data is not None
        # Credit back every DATA frame, also on streams we dropped: otherwise
        # the connection window leaks until the client stalls.
        self._conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or stream.task is not None:
            return
        stream.body += event.data
        if len(stream.body) > self._app.max_request_body:
            self._reject_too_large(stream)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        assert event.stream_id is not None
        stream = self._streams.get(event.stream_id)
        if stream is not None and stream.task is None:
            self._start(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        at = time.monotonic()
        assert event.stream_id is not None
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        if stream.record is not None:
            self._app.log.finish(stream.record, "reset", at=at)
        if stream.task is not None:
            stream.task.cancel()

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if not event.stream_id:
            self._wake_all()
        elif (stream := self._streams.get(event.stream_id)) is not None:
            stream.window_open.set()

    def _drop_streams(self, outcome: Outcome, at: float) -> None:
        """End every stream in flight: log how and when, cancel its task."""
        for stream in self._streams.values():
            if stream.record is not None:
                self._app.log.finish(stream.record, outcome, at=at)
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()

    def _wake_all(self) -> None:
        for stream in self._streams.values():
            stream.window_open.set()

    # -- request tasks ------------------------------------------------------------

    def _start(self, stream: H2Stream) -> None:
        task = asyncio.get_running_loop().create_task(self._app.handle(stream.request(), stream))
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._on_task_done, stream))

    def _on_task_done(self, stream: H2Stream, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("simulator request failed", exc_info=exc)
            if not self._lost:
                self.reset_stream(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        self._maybe_finish_goaway()
        self._check_closed()

    def _check_closed(self) -> None:
        if self._lost and not self._tasks and not self._closed.is_set():
            self._closed.set()
            self._on_closed(self)

    async def wait_closed(self) -> None:
        """Until the connection is gone and every request task has ended."""
        await self._closed.wait()

    def abort(self) -> None:
        """Drop the connection now (kill_after, server shutdown)."""
        if self._transport is not None:
            self._transport.abort()

    # -- the write path -----------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send_head(self, stream: H2Stream, status: int, headers: Headers, content_length: int | None) -> None:
        block = [(b":status", str(status).encode())]
        block += [(name.encode(), value.encode()) for name, value in headers]
        if content_length is not None:
            block.append((b"content-length", str(content_length).encode()))
        try:
            self._conn.send_headers(stream.stream_id, block)
        except h2.exceptions.StreamClosedError as exc:
            raise PeerGone(f"stream {stream.stream_id} is closed") from exc
        self._schedule_flush()

    async def send_data(self, stream: H2Stream, data: bytes, *, end_stream: bool) -> None:
        """Send ``data`` within the peer's windows, waiting for credit."""
        conn, stream_id = self._conn, stream.stream_id
        view = memoryview(data)
        while True:
            if not self._writable.is_set():
                await self._writable.wait()
            if self._lost:
                raise PeerGone("connection lost")
            try:
                window = conn.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError as exc:
                raise PeerGone(f"stream {stream_id} is closed") from exc
            size = min(window, conn.max_outbound_frame_size)
            if len(view) <= size:  # the common case: one token, one frame
                conn.send_data(stream_id, bytes(view), end_stream=end_stream)
                self._schedule_flush()
                return
            if size > 0:
                conn.send_data(stream_id, bytes(view[:size]))
                view = view[size:]
                self._schedule_flush()
            else:
                stream.window_open.clear()
                await stream.window_open.wait()

    def reset_stream(self, stream_id: int, error_code: ErrorCodes) -> None:
        """RST_STREAM now, written before returning."""
        try:
            self._conn.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            return  # already closed on both sides: nothing to reset
        self._flush()

    def _reject_too_large(self, stream: H2Stream) -> None:
        """Answer 413 before the body has all arrived, then ask the client to
        stop sending with RST_STREAM(NO_ERROR) (RFC 9113 §8.1)."""
        body = error_body("openai", 413, f"request body over {self._app.max_request_body} bytes")
        stream_id = stream.stream_id
        fits = len(body) <= self._conn.local_flow_control_window(stream_id)
        head = [(b":status", b"413"), (b"content-type", b"application/json")]
        self._conn.send_headers(stream_id, head, end_stream=not fits)
        if fits:
            self._conn.send_data(stream_id, body, end_stream=True)
        del self._streams[stream_id]
        # A no-op when this DATA frame also ended the request.
        self.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    # -- GOAWAY -------------------------------------------------------------------

    def goaway(self, caller: H2Stream, *, refuse: bool) -> None:
        """Send GOAWAY; serve the streams up to its last_stream_id, then close.

        h2's state machine closes the moment it sends a GOAWAY (python-hyper/h2
        #1181), which rules out serving anything after it; so the frame is
        written here directly, and h2's ``close_connection`` comes at the end.
        """
        last = max(caller.stream_id - 2, 0) if refuse else caller.stream_id
        if self._goaway_last is not None:
            last = min(last, self._goaway_last)  # never raised again (RFC 9113 §6.8)
        self._goaway_last = last
        self._flush()  # what h2 has queued goes first
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(GoAwayFrame(0, last_stream_id=last).serialize())
        # Streams above ``last`` are not ours to answer any more.
        for stream in [s for s in self._streams.values() if s.stream_id > last]:
            if stream is caller:
                continue
            del self._streams[stream.stream_id]
            if stream.record is not None:
                self._app.log.finish(stream.record, "failed")
            if stream.task is not None:
                stream.task.cancel()
        self._maybe_finish_goaway()

    def _maybe_finish_goaway(self) -> None:
        last = self._goaway_last
        if last is None or self._transport is None or self._transport.is_closing():
            return
        if any(stream_id <= last for stream_id in self._streams):
            return
        self._conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=last)
        self._flush()
        self._close_transport()
