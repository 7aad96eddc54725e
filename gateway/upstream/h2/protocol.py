"""The HTTP/2 client's protocol core, without I/O.

Bytes received go in with the clock's value (``receive(data, now)``), and
so do timer ticks (``on_timer(now)``); what comes out is a list of events
(``gateway.upstream.h2.events``) and the bytes to send (``data_to_send()``).
No event loop, no futures, no transport: the asyncio adapter
(``connection.py``) does the I/O, and tests drive this object frame by
frame.

What the core owns, on top of h2's state machine:

- the streams it opened, each with the flow-control credit it still owes
  the peer, returned in batches as the reader consumes data and in full
  when the reader lets the stream go (reset, failed, or read to its end);
- GOAWAY (RFC 9113 §6.8): no new stream afterwards; streams above the
  last-stream-id fail as refused, so they can be sent again elsewhere; the
  connection closes once the rest have finished;
- a cap on the streams one connection opens in its life (``max_streams``):
  past it the connection takes no more and closes once its streams have
  ended, before a server's own per-connection request limit is reached;
- liveness: after ``ping_interval`` seconds without a frame from the peer a
  PING goes out (§6.7), and without any frame ``ping_timeout`` seconds
  later the connection is declared lost, failing its streams well before
  an idle timeout would;
- malformed responses (§8.1.1): h2's inbound header validation is off
  (``machine.py``: it would make them connection errors), and each response
  head, informational head and trailer section is checked here against
  §8.2 and §8.3. A malformed one is a stream error (§5.4.2): that stream
  alone is reset with PROTOCOL_ERROR and fails as ``ProtocolViolation``;
  the connection and its other streams go on;
- floods (RFC 9113 §10.5): h2 acknowledges every PING and SETTINGS frame
  itself. More than ``MAX_UNSENT_ACKS`` acknowledgements queued and not
  handed to a writer that takes them (in one read, or while the adapter's
  writer is paused) end the connection with GOAWAY(ENHANCE_YOUR_CALM), as
  nghttp2 does; its streams fail as ``ConnectionLost``;
- connection errors: a frame h2 rejects ends the connection with h2's
  GOAWAY (§5.4.1), and its streams fail as ``ConnectionLost``, not as
  protocol violations: none of them was malformed, and one that got no
  answer yet may be sent again.
"""

from __future__ import annotations

import itertools
from typing import Final

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from gateway.upstream.base import ResponseHead, UpstreamRequest
from gateway.upstream.errors import (
    ConnectionLost,
    ProtocolViolation,
    StreamRefused,
    StreamReset,
    TransportError,
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
from gateway.upstream.h2.machine import client_state_machine

#: The connection-level receive window we advertise. Stream windows stay at
#: the default 65,535 bytes, so one stalled stream buffers little, but the
#: connection window must be large enough that a few stalled streams cannot
#: starve the others (RFC 9113 §5.2: both windows apply to every DATA frame).
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
DEFAULT_WINDOW: Final = 65_535

#: Consumed bytes are credited to h2 in batches of this much per stream
#: rather than at every read, which keeps h2's bookkeeping off the per-chunk
#: path. Flow control stays live (RFC 9113 §6.9): h2 sends a WINDOW_UPDATE
#: once half a window is credited, so a stream's peer keeps at least
#: 65,535 - 32,767 - ACK_BATCH_BYTES of window while its reader keeps up.
ACK_BATCH_BYTES: Final = 8192

#: PING and SETTINGS acknowledgements that may wait to be sent: past it the
#: peer is flooding the connection (RFC 9113 §10.5; CVE-2019-9512 and -9515)
#: and it ends with GOAWAY(ENHANCE_YOUR_CALM). nghttp2's default for the
#: same limit (``max_outbound_ack``). A peer that reads what we send keeps
#: the count low: it restarts each time the queued bytes go to a writer that
#: is not paused.
MAX_UNSENT_ACKS: Final = 1000

#: A deadline this close to the clock counts as reached: uvloop fires timers
#: up to half a millisecond early, and re-arming for a deadline that has not
#: quite come would spin.
_CLOCK_SLACK: Final = 0.001


class _ConnectionError(Exception):
    """A connection error (RFC 9113 §5.4.1) found among h2's events:
    ``receive`` ends the connection with GOAWAY(``code``)."""

    def __init__(self, code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    """What the core keeps per stream until its reader lets it go."""

    __slots__ = ("body_pending", "open", "owed", "unconsumed")

    def __init__(self, *, body_pending: bool) -> None:
        #: Neither ended, reset nor failed: it holds a concurrency slot.
        self.open = True
        #: Our END_STREAM has not gone yet: the request body is still being
        #: sent (h2 keeps such a stream half-closed until we end or reset it).
        self.body_pending = body_pending
        #: Received, not yet consumed by the reader.
        self.unconsumed = 0
        #: Consumed, not yet credited to h2 (below a batch).
        self.owed = 0


class H2ClientProtocol:
    """One client connection's HTTP/2 state."""

    def __init__(
        self,
        *,
        authority: str,
        scheme: str,
        ping_interval: float | None,
        ping_timeout: float,
        max_streams: int | None = None,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self._h2 = client_state_machine()
        self._authority = authority.encode()
        self._scheme = scheme.encode()
        self._connection_window = connection_window
        # Once all streams together owe this much, or the peer's view of our
        # connection window falls below it, everything owed is credited at
        # every read: small debts on many streams must not exhaust the
        # shared window.
        self._owed_limit = connection_window // 4
        self._streams: dict[int, _Stream] = {}
        self._active = 0
        self._owed_total = 0
        self._ready = False
        self._closed = False
        # The lowest last-stream-id of the GOAWAYs received, if any.
        self._goaway_last: int | None = None
        # Set when h2 refuses to open another stream (ids exhausted, §5.1.1),
        # or when ``max_streams`` have been opened.
        self._exhausted = False
        self._max_streams = max_streams
        self._opened = 0
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_ids = itertools.count(1)
        self._last_heard = 0.0
        self._ping_sent_at: float | None = None
        # PING and SETTINGS ACKs h2 queued since the bytes last went to a
        # writer that takes them, and whether the writer is paused.
        self._unsent_acks = 0
        self._send_paused = False

    # -- what the adapter and the pool read ---------------------------------------

    @property
    def is_usable(self) -> bool:
        """Takes new streams: preface received, alive, no GOAWAY."""
        return self._ready and not (self._closed or self._exhausted) and self._goaway_last is None

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_draining(self) -> bool:
        """Alive but taking no new streams: finishing those it has."""
        return not self._closed and (self._goaway_last is not None or self._exhausted)

    @property
    def active_streams(self) -> int:
        """Streams holding a concurrency slot (neither ended nor reset)."""
        return self._active

    @property
    def free_streams(self) -> int:
        if not self.is_usable:
            return 0
        return max(0, self._h2.remote_settings.max_concurrent_streams - self._active)

    def data_to_send(self) -> bytes:
        """What to write now. Handed to a writer that is not paused, the
        acknowledgements among it count as sent."""
        if not self._send_paused:
            self._unsent_acks = 0
        return self._h2.data_to_send()

    def pause_sending(self) -> None:
        """The writer holds more than it should (the peer is not reading):
        what ``data_to_send()`` hands out from now on waits in memory, and
        the acknowledgements among it count until ``resume_sending()``."""
        self._send_paused = True

    def resume_sending(self) -> None:
        """The writer drained: what it held has gone to the peer."""
        self._send_paused = False
        self._unsent_acks = 0

    # -- the connection -------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """The client preface and our SETTINGS, and the connection window
        raised from its default (RFC 9113 §6.9.2)."""
        self._h2.initiate_connection()
        if self._connection_window > DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(self._connection_window - DEFAULT_WINDOW)
        self._last_heard = now

    def receive(self, data: bytes, now: float) -> list[Event]:
        if self._closed:
            return []
        try:
            received = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # A connection error (§5.4.1): h2 has queued its GOAWAY. The
            # streams were not at fault: they fail as the connection lost.
            return self._end(ConnectionLost(f"upstream connection ended by an HTTP/2 protocol error: {exc}"))
        # Any frame proves the peer alive: a PING is for silence only.
        self._last_heard = now
        self._ping_sent_at = None
        events: list[Event] = []
        try:
            for event in received:
                self._translate(event, events)
        except _ConnectionError as exc:
            # What h2 queued in answer to these bytes (after a flood, its
            # acknowledgements) is moot: only the GOAWAY goes.
            self._h2.clear_outbound_data_buffer()
            try:
                self._h2.close_connection(exc.code)
            except h2.exceptions.ProtocolError:
                pass  # h2's state is already closed: nothing to say to the peer
            events.extend(self._end(ConnectionLost(str(exc))))
        return events

    def lose(self, error: TransportError) -> list[Event]:
        """The transport is gone (or unusable, ``error`` says why)."""
        return self._end(error)

    def close(self) -> list[Event]:
        """Close politely: GOAWAY(NO_ERROR); streams still open fail."""
        if self._closed:
            return []
        try:
            self._h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass  # h2's state is already closed: nothing to say to the peer
        return self._end(ConnectionLost("upstream connection was closed"), polite=True)

    # -- liveness -------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``on_timer`` has something to decide, on the clock of ``now``."""
        if self._closed or self._ping_interval is None:
            return None
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self._ping_timeout
        return self._last_heard + self._ping_interval

    def on_timer(self, now: float) -> list[Event]:
        """A PING after ``ping_interval`` of silence; the connection lost
        when nothing at all came for ``ping_timeout`` after it."""
        if self._closed or self._ping_interval is None:
            return []
        due = now + _CLOCK_SLACK
        if self._ping_sent_at is not None:
            if due >= self._ping_sent_at + self._ping_timeout:
                return self._end(
                    ConnectionLost(f"upstream did not answer a PING within {self._ping_timeout:g} s")
                )
        elif due >= self._last_heard + self._ping_interval:
            self._h2.ping(next(self._ping_ids).to_bytes(8, "big"))
            self._ping_sent_at = now
        return []

    # -- streams --------------------------------------------------------------------

    def start_request(self, request: UpstreamRequest) -> int:
        """HEADERS for ``request`` (with END_STREAM when it has no body);
        returns the new stream's id. Raises ``StreamRefused`` when the
        connection takes no more streams: another one will."""
        if not self.is_usable:
            raise StreamRefused("connection no longer takes new streams")
        headers = [
            (b":method", request.method.encode()),
            (b":scheme", self._scheme),
            (b":authority", self._authority),
            (b":path", request.path.encode()),
        ]
        headers.extend((name.encode(), value.encode()) for name, value in request.headers)
        if request.body:
            headers.append((b"content-length", str(len(request.body)).encode()))
        try:
            stream_id = self._h2.get_next_available_stream_id()
            self._h2.send_headers(stream_id, headers, end_stream=not request.body)
        except h2.exceptions.ProtocolError as exc:
            # Stream ids exhausted (2^31, RFC 9113 §5.1.1) or the peer's
            # limit reached: this connection takes no more.
            self._exhausted = True
            raise StreamRefused(f"connection cannot open a stream: {exc}") from exc
        self._streams[stream_id] = _Stream(body_pending=bool(request.body))
        self._active += 1
        self._opened += 1
        if self._max_streams is not None and self._opened >= self._max_streams:
            self._exhausted = True
        return stream_id

    def can_send(self, stream_id: int) -> bool:
        """The stream is still open for its request body."""
        stream = self._streams.get(stream_id)
        return stream is not None and stream.open and not self._closed

    def send_data(self, stream_id: int, data: bytes | memoryview, *, end_stream: bool) -> int:
        """As much of ``data`` as the send windows allow (RFC 9113 §6.9.1),
        END_STREAM with the last of it when ``end_stream``; returns how many
        bytes went. 0: wait for ``WindowOpened``."""
        window = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        if window <= 0:
            return 0
        piece = data[:window]
        last = end_stream and len(piece) == len(data)
        self._h2.send_data(stream_id, bytes(piece), end_stream=last)
        if last and (stream := self._streams.get(stream_id)) is not None:
            stream.body_pending = False
        return len(piece)

    def consumed(self, stream_id: int, length: int) -> bool:
        """The reader took ``length`` bytes of the stream: credit them to the
        peer's windows, a batch at a time. True when credit went to h2 (a
        WINDOW_UPDATE may be waiting in ``data_to_send()``); below a batch
        nothing is sent, and nothing needs flushing."""
        stream = self._streams.get(stream_id)
        if stream is None or length == 0 or self._closed:
            return False
        stream.unconsumed -= length
        owed = stream.owed + length
        self._owed_total += length
        window_left = self._owed_total < self._owed_limit and (
            self._h2.inbound_flow_control_window >= self._owed_limit
        )
        if owed < ACK_BATCH_BYTES and window_left:
            stream.owed = owed
            return False
        if window_left:
            stream.owed = 0
            self._owed_total -= owed
            self._h2.acknowledge_received_data(owed, stream_id)
        else:
            stream.owed = owed
            self._settle_all_owed()
        return True

    def release(self, stream_id: int) -> list[Event]:
        """The reader needs nothing more from the stream: RST_STREAM(CANCEL)
        if it is still open (in ``data_to_send()`` when this returns; RFC
        9113 §8.7), and every byte it received and did not credit yet is
        credited now, consumed or not, so the connection window stays whole.
        A no-op for a stream already released."""
        stream = self._streams.pop(stream_id, None)
        if stream is None or self._closed:
            return []
        events: list[Event] = []
        if stream.open:
            self._active -= 1
            self._reset(stream_id, ErrorCodes.CANCEL)
            events.append(CapacityChanged())
        elif stream.body_pending:
            # The whole answer came before the whole request (an early 413,
            # say): the stream is half-closed on our side until we end it, and
            # its answer is complete, so NO_ERROR (RFC 9113 §8.1).
            self._reset(stream_id, ErrorCodes.NO_ERROR)
        self._owed_total -= stream.owed
        if credit := stream.owed + stream.unconsumed:
            self._h2.acknowledge_received_data(credit, stream_id)
        if self.is_draining and self._active == 0:
            events.extend(self.close())
        return events

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self._h2.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass  # closed by the peer in the frames just read

    # -- h2's events, translated ----------------------------------------------------

    def _translate(self, event: h2.events.Event, events: list[Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.flow_controlled_length is not None
            self._on_data(event.stream_id, event.data or b"", event.flow_controlled_length, events)
        elif isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            if event.stream_id in self._streams:
                try:
                    head = response_head(event.headers)
                except ProtocolViolation as exc:
                    self._malformed(event.stream_id, exc, events)
                else:
                    events.append(HeadReceived(event.stream_id, head))
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            if self._close_stream(event.stream_id):
                events.append(StreamEnded(event.stream_id))
                self._after_stream_closed(events)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            if self._close_stream(event.stream_id):
                error = (
                    reset_error(event.error_code)
                    if event.remote_reset
                    else local_reset_error(event.error_code)
                )
                events.append(StreamFailed(event.stream_id, error))
                self._after_stream_closed(events)
        elif isinstance(event, h2.events.WindowUpdated):
            events.append(WindowOpened(event.stream_id or 0))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._ack_queued()  # h2 acknowledges every SETTINGS frame (§6.5.3)
            if not self._ready:
                self._ready = True
                events.append(Ready())
            # INITIAL_WINDOW_SIZE and MAX_CONCURRENT_STREAMS may have grown.
            events.append(WindowOpened(0))
            events.append(CapacityChanged())
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event.last_stream_id or 0, event.error_code, events)
        elif isinstance(event, h2.events.InformationalResponseReceived | h2.events.TrailersReceived):
            # Nothing a client relaying the body needs, but a malformed one
            # makes the response malformed (§8.1.1).
            assert event.stream_id is not None and event.headers is not None
            try:
                if isinstance(event, h2.events.TrailersReceived):
                    check_trailers(event.headers)
                else:
                    response_head(event.headers)
            except ProtocolViolation as exc:
                self._malformed(event.stream_id, exc, events)
        elif isinstance(event, h2.events.PingReceived):
            self._ack_queued()  # h2 has queued the PING ACK (§6.7)
        elif isinstance(event, h2.events.RequestReceived):
            # HEADERS opening a stream from the server, which opens streams
            # only by reserving them with PUSH_PROMISE (§8.4). h2 takes it
            # for a request, which its inbound header validation used to
            # reject: a connection error (§5.4.1).
            raise _ConnectionError(
                ErrorCodes.PROTOCOL_ERROR,
                "upstream connection ended by an HTTP/2 protocol error: "
                f"HEADERS opened stream {event.stream_id}",
            )
        # A PING ACK needs nothing more than the liveness noted in
        # receive(). SETTINGS ACKs and priority frames need nothing either.

    def _ack_queued(self) -> None:
        self._unsent_acks += 1
        if self._unsent_acks > MAX_UNSENT_ACKS:
            raise _ConnectionError(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"upstream flooded the connection: more than {MAX_UNSENT_ACKS} PING and SETTINGS "
                "frames to acknowledge, unsent",
            )

    def _malformed(self, stream_id: int, error: ProtocolViolation, events: list[Event]) -> None:
        """A malformed response (§8.1.1) is a stream error of type
        PROTOCOL_ERROR (§5.4.2): RST_STREAM for it, and it fails alone."""
        self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.body_pending = False  # reset: nothing more to end
        if self._close_stream(stream_id):
            events.append(StreamFailed(stream_id, error))
            self._after_stream_closed(events)

    def _on_data(self, stream_id: int, data: bytes, flow_length: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or not data or not stream.open:
            # Nothing anyone will read: an empty or padding-only frame (legal,
            # and not the end of the body), or data read in the same bytes
            # as the malformed head that failed its stream. h2 counted it
            # against our windows, so its credit goes back now, or the
            # connection window leaks. (DATA for a stream h2 has closed --
            # one we reset before -- never gets here: h2 credits it itself.)
            self._h2.acknowledge_received_data(flow_length, stream_id)
            return
        if flow_length > len(data):
            # Padding is never read: credited at once.
            self._h2.acknowledge_received_data(flow_length - len(data), stream_id)
        stream.unconsumed += len(data)
        events.append(DataReceived(stream_id, data))

    def _close_stream(self, stream_id: int) -> bool:
        """Mark an open stream closed; False if it was not open."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.open:
            return False
        stream.open = False
        self._active -= 1
        return True

    def _after_stream_closed(self, events: list[Event]) -> None:
        events.append(CapacityChanged())
        if self.is_draining and self._active == 0:
            events.extend(self.close())

    def _on_goaway(self, last_stream_id: int, error_code: int | None, events: list[Event]) -> None:
        """RFC 9113 §6.8: streams above ``last_stream_id`` were not processed
        and fail as refused; those at or below it run to completion, unless
        the GOAWAY carries an error, which ends the connection."""
        if self._goaway_last is None or last_stream_id < self._goaway_last:
            self._goaway_last = last_stream_id
        refused = StreamRefused("upstream sent GOAWAY before processing the stream")
        for stream_id in [sid for sid, s in self._streams.items() if s.open and sid > last_stream_id]:
            self._close_stream(stream_id)
            events.append(StreamFailed(stream_id, refused))
        if error_code not in (None, ErrorCodes.NO_ERROR):
            events.extend(self._end(ConnectionLost(f"upstream sent GOAWAY ({code_name(error_code)})")))
            return
        self._after_stream_closed(events)

    def _end(self, error: TransportError, *, polite: bool = False) -> list[Event]:
        """The connection is over: every stream still open fails (as refused
        if a GOAWAY said it was not processed), and nothing is owed."""
        if self._closed:
            return []
        self._closed = True
        events: list[Event] = []
        refused = StreamRefused("upstream closed the connection before processing the stream")
        last = self._goaway_last
        for stream_id, stream in self._streams.items():
            if stream.open:
                unprocessed = last is not None and stream_id > last
                events.append(StreamFailed(stream_id, refused if unprocessed else error))
        self._streams.clear()
        self._active = 0
        self._owed_total = 0
        events.append(ConnectionEnded(None if polite else error))
        return events

    def _settle_all_owed(self) -> None:
        for stream_id, stream in self._streams.items():
            if stream.owed:
                self._h2.acknowledge_received_data(stream.owed, stream_id)
                stream.owed = 0
        self._owed_total = 0


#: The bytes a field name may hold (RFC 9113 §8.2.1): visible ASCII but
#: upper case letters and the colon (a pseudo-header's leading colon aside).
_FIELD_NAME_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if not (0x41 <= c <= 0x5A or c == 0x3A))
#: Connection-specific fields make a message malformed (§8.2.2); so does TE
#: with any value but "trailers".
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def response_head(raw_headers: list[tuple[bytes, bytes]]) -> ResponseHead:
    """A response head's fields, checked as h2 would with its inbound
    validation on (``machine.py`` turns it off). Raises ``ProtocolViolation``
    when the head is malformed (RFC 9113 §8.1.1): a pseudo-header other than
    one ``:status`` (request pseudo-headers included), one after a regular
    field, no ``:status`` or a malformed one (§8.3, §8.3.2), or a field
    ``check_field`` rejects."""
    status: int | None = None
    headers: list[tuple[str, str]] = []
    for name, value in raw_headers:
        if name[:1] == b":":
            if headers:
                raise ProtocolViolation("upstream sent a pseudo-header field after a regular field")
            if name != b":status":
                raise ProtocolViolation(f"upstream sent a response with the pseudo-header {name!r}")
            if status is not None:
                raise ProtocolViolation("upstream sent a response head with two :status fields")
            status = status_code(value)
        else:
            check_field(name, value)
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
    if status is None:
        raise ProtocolViolation("upstream sent a response head without :status")
    return ResponseHead(status=status, headers=tuple(headers), http_version="HTTP/2")


def check_trailers(raw_headers: list[tuple[bytes, bytes]]) -> None:
    """Raises ``ProtocolViolation`` for a malformed trailer section: one
    with a pseudo-header (§8.1) or a field ``check_field`` rejects."""
    for name, value in raw_headers:
        if name[:1] == b":":
            raise ProtocolViolation(f"upstream sent trailers with the pseudo-header {name!r}")
        check_field(name, value)


def check_field(name: bytes, value: bytes) -> None:
    """Raises ``ProtocolViolation`` for a regular field that makes a message
    malformed: an empty name, or one with a byte §8.2.1 forbids (upper case
    above all); a value with NUL, CR or LF, or starting or ending with
    white space (§8.2.1); a connection-specific field (§8.2.2)."""
    if not name or name.translate(None, _FIELD_NAME_BYTES):
        raise ProtocolViolation(f"upstream sent an invalid field name {name!r}")
    if value and (
        b"\0" in value or b"\r" in value or b"\n" in value or value[0] in b" \t" or value[-1] in b" \t"
    ):
        raise ProtocolViolation(f"upstream sent an invalid value for the field {name!r}")
    if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
        raise ProtocolViolation(f"upstream sent the connection-specific field {name!r}")


def status_code(value: bytes) -> int:
    """A ``:status`` value: three digits, 100 to 599 (RFC 9110 §15; RFC 9113
    §8.3.2). ``int()`` alone would take "2_00" or "+42"."""
    if len(value) == 3 and value.isdigit() and 100 <= (status := int(value)) <= 599:
        return status
    raise ProtocolViolation("upstream sent a response head with a malformed :status")


def reset_error(error_code: int | None) -> TransportError:
    if error_code == ErrorCodes.REFUSED_STREAM:
        # RFC 9113 §8.7: no application processing happened, so the request
        # may be sent again.
        return StreamRefused("upstream refused the stream")
    return StreamReset(f"upstream reset the stream ({code_name(error_code)})", error_code=error_code)


def local_reset_error(error_code: int | None) -> TransportError:
    """h2 reset the stream itself, for a stream error of the peer's (a
    WINDOW_UPDATE past 2^31-1: FLOW_CONTROL_ERROR, RFC 9113 §6.9.1)."""
    return StreamReset(
        f"gateway reset the stream for an upstream stream error ({code_name(error_code)})",
        error_code=error_code,
    )


def code_name(error_code: int | None) -> str:
    if error_code is None:
        return "no error code"
    try:
        return ErrorCodes(error_code).name
    except ValueError:
        return f"error code {error_code}"
