"""The HTTP/2 client's protocol core, frame by frame: hyperframe bytes in
(with a clock value), our events and exact bytes out; no sockets, no loop.
One rule per test, in the manner of python-hyper/h2's own tests."""

from __future__ import annotations

import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from gateway.upstream.base import ResponseHead, UpstreamRequest
from gateway.upstream.errors import (
    ConnectionLost,
    ProtocolViolation,
    StreamRefused,
    StreamReset,
)
from gateway.upstream.h2.events import (
    CapacityChanged,
    ConnectionEnded,
    DataReceived,
    Event,
    HeadReceived,
    StreamEnded,
    StreamFailed,
    WindowOpened,
)
from gateway.upstream.h2.protocol import ACK_BATCH_BYTES, MAX_UNSENT_ACKS, H2ClientProtocol

REQUEST = UpstreamRequest("GET", "/v1/models", (("accept", "application/json"),))
#: The default window (RFC 9113 §6.9.2) for the connection too, so h2's
#: half-window rule for WINDOW_UPDATE applies to both at 32,767 bytes.
WINDOW = 65_535


class Peer:
    """The server side, as frames: what a test feeds the core."""

    def __init__(self) -> None:
        self._encoder = hpack.Encoder()

    def headers(self, stream_id: int, status: int | str = 200, *, end_stream: bool = False) -> bytes:
        return self.fields(stream_id, [(":status", str(status)), ("content-type", "text/plain")],
                           end_stream=end_stream)

    def fields(self, stream_id: int, fields: list[tuple[str, str]], *, end_stream: bool = False) -> bytes:
        """A HEADERS frame with exactly these fields, in this order."""
        frame = HeadersFrame(stream_id)
        frame.data = self._encoder.encode(fields)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()


def frame_bytes(*frames: Frame) -> bytes:
    return b"".join(frame.serialize() for frame in frames)


def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    frame = DataFrame(stream_id, payload)
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()


def data_of(stream_id: int, length: int) -> bytes:
    """``length`` bytes of DATA on the stream, in frames of at most 16,384."""
    frames = []
    while length > 0:
        size = min(length, 16_384)
        frames.append(data(stream_id, b"x" * size))
        length -= size
    return b"".join(frames)


def rst(stream_id: int, code: ErrorCodes) -> bytes:
    return RstStreamFrame(stream_id, error_code=code).serialize()


def goaway(last_stream_id: int, code: ErrorCodes = ErrorCodes.NO_ERROR) -> bytes:
    return GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code).serialize()


def window_update(stream_id: int, increment: int) -> bytes:
    return WindowUpdateFrame(stream_id, window_increment=increment).serialize()


@pytest.fixture
def peer() -> Peer:
    return Peer()


@pytest.fixture
def core() -> H2ClientProtocol:
    """A core past the preface: our SETTINGS sent, the server's received and
    acknowledged, nothing left to send."""
    core = H2ClientProtocol(
        authority="upstream.test",
        scheme="http",
        ping_interval=10.0,
        ping_timeout=5.0,
        connection_window=WINDOW,
    )
    core.initiate(now=0.0)
    core.data_to_send()
    core.receive(SettingsFrame(0).serialize(), now=0.0)
    core.data_to_send()  # the SETTINGS ACK
    return core


def frames_in(sent: bytes) -> list[Frame]:
    """The frames ``sent`` holds, parsed."""
    frames = []
    view = memoryview(sent)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def open_streams(core: H2ClientProtocol, count: int) -> list[int]:
    ids = [core.start_request(REQUEST) for _ in range(count)]
    core.data_to_send()  # their HEADERS
    return ids


# -- opening -------------------------------------------------------------------


def test_no_stream_opens_before_the_servers_preface() -> None:
    """Streams wait for the server's SETTINGS (RFC 9113 §3.4): until then the
    connection takes none."""
    core = H2ClientProtocol(authority="a", scheme="http", ping_interval=None, ping_timeout=5.0)
    core.initiate(now=0.0)
    assert not core.is_usable and core.free_streams == 0
    with pytest.raises(StreamRefused):
        core.start_request(REQUEST)


def test_a_connection_out_of_stream_ids_refuses_the_request_and_drains(core) -> None:
    """Client stream ids end at 2^31-1 (RFC 9113 §5.1.1): the request is
    refused, to be sent on another connection, and this one takes no more."""
    core._h2.highest_outbound_stream_id = 2**31 - 1
    with pytest.raises(StreamRefused):
        core.start_request(REQUEST)
    assert not core.is_usable and core.is_draining
    assert core.data_to_send() == b""


def test_the_response_head_and_body_come_as_events(core, peer) -> None:
    """HEADERS, DATA and END_STREAM become HeadReceived, DataReceived and
    StreamEnded for the stream; its slot frees."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(peer.headers(stream_id) + data(stream_id, b"hello", end_stream=True), now=1.0)
    assert events == [
        HeadReceived(stream_id, ResponseHead(200, (("content-type", "text/plain"),), "HTTP/2")),
        DataReceived(stream_id, b"hello"),
        StreamEnded(stream_id),
        CapacityChanged(),
    ]
    assert core.active_streams == 0


# -- resets ----------------------------------------------------------------------


def test_a_reset_is_written_in_the_same_call_that_cancels(core) -> None:
    """release() on an open stream queues RST_STREAM(CANCEL) before it
    returns (RFC 9113 §8.7): the adapter writes it in the same call."""
    (stream_id,) = open_streams(core, 1)
    assert core.release(stream_id) == [CapacityChanged()]
    assert core.data_to_send() == rst(stream_id, ErrorCodes.CANCEL)
    assert core.active_streams == 0


def test_releasing_a_stream_that_ended_sends_no_reset(core, peer) -> None:
    """A stream the peer ended is given back without RST_STREAM."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id, end_stream=True), now=1.0)
    core.data_to_send()
    assert core.release(stream_id) == []
    assert core.data_to_send() == b""


def test_an_answer_complete_before_the_request_body_resets_with_no_error(core, peer) -> None:
    """The server answered (an early 413) before our body ended: the stream
    is half-closed on our side until we end it, so release() sends
    RST_STREAM(NO_ERROR) (RFC 9113 §8.1) and h2 counts it open no more."""
    stream_id = core.start_request(UpstreamRequest("POST", "/v1/x", (), b"b" * 100_000))
    assert core.send_data(stream_id, b"b" * 100_000, end_stream=True) == 16_384  # one frame
    core.data_to_send()
    events = core.receive(peer.headers(stream_id, 413, end_stream=True), now=1.0)
    assert StreamEnded(stream_id) in events and not core.can_send(stream_id)
    assert core.release(stream_id) == []
    assert core.data_to_send() == rst(stream_id, ErrorCodes.NO_ERROR)
    assert core._h2.open_outbound_streams == 0


def test_a_request_whose_body_was_all_sent_needs_no_reset_after_its_answer(core, peer) -> None:
    stream_id = core.start_request(UpstreamRequest("POST", "/v1/x", (), b"small"))
    assert core.send_data(stream_id, b"small", end_stream=True) == 5
    core.data_to_send()
    core.receive(peer.headers(stream_id, end_stream=True), now=1.0)
    core.data_to_send()
    assert core.release(stream_id) == []
    assert core.data_to_send() == b""


def test_refused_stream_fails_as_refused_and_the_connection_stays(core) -> None:
    """RST_STREAM(REFUSED_STREAM): nothing was processed (RFC 9113 §8.7), so
    the stream fails as StreamRefused, which may be sent again; the
    connection still takes streams."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(rst(stream_id, ErrorCodes.REFUSED_STREAM), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, CapacityChanged]
    assert isinstance(events[0], StreamFailed) and type(events[0].error) is StreamRefused
    assert core.is_usable and core.free_streams > 0


def test_another_reset_code_fails_the_stream_as_reset(core) -> None:
    """RST_STREAM with any other code may follow processing: StreamReset,
    carrying the code, never StreamRefused."""
    (stream_id,) = open_streams(core, 1)
    (failed, _) = core.receive(rst(stream_id, ErrorCodes.INTERNAL_ERROR), now=1.0)
    assert isinstance(failed, StreamFailed) and isinstance(failed.error, StreamReset)
    assert failed.error.error_code == ErrorCodes.INTERNAL_ERROR
    assert "INTERNAL_ERROR" in str(failed.error)


def test_a_send_window_overflow_resets_the_stream_as_ours(core) -> None:
    """A WINDOW_UPDATE that takes a stream's send window past 2^31-1 is a
    stream error of type FLOW_CONTROL_ERROR (RFC 9113 §6.9.1): h2 sends the
    RST_STREAM, and the failure says the gateway reset the stream, for the
    upstream's error, not that the upstream reset it. The connection goes
    on."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(window_update(stream_id, 2**31 - 1), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, CapacityChanged]
    failed = events[0]
    assert isinstance(failed, StreamFailed) and type(failed.error) is StreamReset
    assert failed.error.error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert str(failed.error) == "gateway reset the stream for an upstream stream error (FLOW_CONTROL_ERROR)"
    assert core.data_to_send() == rst(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
    assert core.is_usable


# -- flow-control credit ---------------------------------------------------------


def test_credit_below_a_batch_is_held(core, peer) -> None:
    """Consumed bytes below ACK_BATCH_BYTES are not credited yet."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data_of(stream_id, 40_000), now=1.0)
    assert core.consumed(stream_id, ACK_BATCH_BYTES - 1) is False
    assert core.data_to_send() == b""


def test_consumed_bytes_are_credited_to_both_windows(core, peer) -> None:
    """Past half of each window (h2's rule), consuming the data sends
    WINDOW_UPDATE for the connection and for the stream."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data_of(stream_id, 40_000), now=1.0)
    assert core.consumed(stream_id, 40_000) is True
    assert core.data_to_send() == window_update(0, 40_000) + window_update(stream_id, 40_000)


def test_credit_is_returned_when_a_stream_is_reset_unread(core, peer) -> None:
    """Data received and never read still counts against the connection
    window: resetting the stream credits all of it, after the RST_STREAM."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data_of(stream_id, 40_000), now=1.0)
    core.consumed(stream_id, 1_000)  # read a little: owed, below a batch
    core.release(stream_id)
    assert core.data_to_send() == rst(stream_id, ErrorCodes.CANCEL) + window_update(0, 40_000)


def test_credit_is_returned_when_the_peer_resets_a_stream(core, peer) -> None:
    """A stream the peer reset with data unread: releasing it credits the
    connection window, with no RST_STREAM of ours."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data_of(stream_id, 40_000), now=1.0)
    core.receive(rst(stream_id, ErrorCodes.INTERNAL_ERROR), now=1.0)
    core.release(stream_id)
    assert core.data_to_send() == window_update(0, 40_000)


def test_data_after_our_reset_is_credited(core, peer) -> None:
    """DATA the peer sent before it saw our RST_STREAM still uses the
    connection window: it is credited (by h2, for a stream it closed), and
    it is no event of ours."""
    (stream_id,) = open_streams(core, 1)
    core.release(stream_id)
    core.data_to_send()
    assert core.receive(data_of(stream_id, 40_000), now=1.0) == []
    # h2 answers each frame with RST_STREAM(STREAM_CLOSED) and credits the
    # connection window, which reaches half its size at the second frame.
    closed = rst(stream_id, ErrorCodes.STREAM_CLOSED)
    assert core.data_to_send() == closed + window_update(0, 32_768) + closed + closed


def test_small_debts_on_many_streams_are_settled_together(core, peer) -> None:
    """Each stream owes less than a batch, but once all of them owe a
    quarter of the connection window together, everything owed is
    credited: six streams of 6,000 bytes credit 36,000 at once."""
    ids = open_streams(core, 6)
    for stream_id in ids:
        core.receive(peer.headers(stream_id) + data(stream_id, b"x" * 6_000), now=1.0)
    for stream_id in ids:
        core.consumed(stream_id, 6_000)
    assert core.data_to_send() == window_update(0, 36_000)


def test_padding_is_credited_on_arrival(core, peer) -> None:
    """Padding is never read: its part of a DATA frame is credited at once,
    the data only as it is consumed."""
    (stream_id,) = open_streams(core, 1)
    frames = []
    for _ in range(129):
        frame = DataFrame(stream_id, b"x")
        frame.flags.add("PADDED")
        frame.pad_length = 254
        frames.append(frame)
    core.receive(peer.headers(stream_id) + frame_bytes(*frames), now=1.0)
    # 256 bytes counted a frame (payload, pad length byte, padding), 255 of
    # them padding: 32,895 credited on arrival, past h2's half-window
    # threshold, so a WINDOW_UPDATE for each window before anything is read.
    assert core.data_to_send() == window_update(0, 129 * 255) + window_update(stream_id, 129 * 255)
    core.release(stream_id)
    # The 129 data bytes, credited now, are below the threshold: only the reset.
    assert core.data_to_send() == rst(stream_id, ErrorCodes.CANCEL)


# -- GOAWAY ----------------------------------------------------------------------


def test_goaway_refuses_streams_above_its_last_stream_id(core, peer) -> None:
    """GOAWAY(NO_ERROR, last=3) with streams 1, 3 and 5 open: 5 was not
    processed (RFC 9113 §6.8) and fails as refused; 1 and 3 go on."""
    first, second, third = open_streams(core, 3)
    (failed, capacity) = core.receive(goaway(second), now=1.0)
    assert isinstance(failed, StreamFailed) and failed.stream_id == third
    assert type(failed.error) is StreamRefused
    assert capacity == CapacityChanged()
    assert core.active_streams == 2
    answer = peer.headers(first) + data(first, b"still")
    assert core.receive(answer, now=1.0)[1:] == [DataReceived(first, b"still")]


def test_no_stream_opens_after_a_goaway(core) -> None:
    """A connection that received GOAWAY takes no new stream."""
    open_streams(core, 1)
    core.receive(goaway(1), now=1.0)
    assert core.is_draining and not core.is_usable and core.free_streams == 0
    with pytest.raises(StreamRefused):
        core.start_request(REQUEST)


def test_after_goaway_the_connection_closes_when_its_last_stream_ends(core, peer) -> None:
    """Once the streams a GOAWAY let finish have ended, the core closes the
    connection politely: our own GOAWAY(NO_ERROR), then ConnectionEnded."""
    (stream_id,) = open_streams(core, 1)
    core.receive(goaway(stream_id), now=1.0)
    events = core.receive(peer.headers(stream_id, end_stream=True), now=1.0)
    assert events[-1] == ConnectionEnded(None)
    assert core.data_to_send() == goaway(0)
    assert core.is_closed


def test_goaway_with_an_error_code_ends_the_connection(core) -> None:
    """GOAWAY(INTERNAL_ERROR, last=1) with streams 1 and 3: 3 fails as
    refused, 1 as a lost connection naming the code, and the connection
    ends."""
    first, second = open_streams(core, 2)
    events = core.receive(goaway(first, ErrorCodes.INTERNAL_ERROR), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, StreamFailed, ConnectionEnded]
    by_stream = {e.stream_id: e.error for e in events if isinstance(e, StreamFailed)}
    assert type(by_stream[second]) is StreamRefused
    assert type(by_stream[first]) is ConnectionLost
    assert str(by_stream[first]) == "upstream sent GOAWAY (INTERNAL_ERROR)"
    assert isinstance(events[-1], ConnectionEnded) and events[-1].error is by_stream[first]
    assert core.is_closed


def test_a_connection_lost_after_goaway_refuses_the_streams_above_it(core) -> None:
    """The transport closes right after a GOAWAY(last=1): stream 3, above
    the last id, was not processed and fails as refused; stream 1 was cut
    off and fails as a lost connection."""
    first, second = open_streams(core, 2)
    core.receive(goaway(first), now=1.0)
    events = core.lose(ConnectionLost("upstream connection was lost"))
    assert [type(e) for e in events] == [StreamFailed, ConnectionEnded]
    assert isinstance(events[0], StreamFailed) and events[0].stream_id == first
    assert type(events[0].error) is ConnectionLost


def test_a_goaway_keeps_the_headers_of_a_request_not_yet_sent(core) -> None:
    """A request opened in the loop iteration that reads a GOAWAY whose
    last-stream-id covers it (2^31-1: shutting down soon, RFC 9113 §6.8):
    its HEADERS, queued before the GOAWAY was read, still go out, and the
    stream stays open for its answer."""
    stream_id = core.start_request(REQUEST)
    assert core.receive(goaway(2**31 - 1), now=1.0) == [CapacityChanged()]
    (headers,) = frames_in(core.data_to_send())
    assert isinstance(headers, HeadersFrame) and headers.stream_id == stream_id
    assert "END_STREAM" in headers.flags
    assert (":path", "/v1/models") in hpack.Decoder().decode(headers.data)
    assert core.active_streams == 1 and core.is_draining


def test_a_goaway_keeps_the_window_updates_queued_before_it(core, peer) -> None:
    """Credit that consumed() queued before a GOAWAY was read still goes
    out: the answer the GOAWAY lets finish would wait for it for good."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data_of(stream_id, 40_000), now=1.0)
    assert core.consumed(stream_id, 40_000) is True
    core.receive(goaway(stream_id), now=1.0)
    assert core.data_to_send() == window_update(0, 40_000) + window_update(stream_id, 40_000)


# -- liveness --------------------------------------------------------------------


def test_a_ping_goes_out_after_the_interval_of_silence(core) -> None:
    """No frame for ping_interval (10 s): PING (RFC 9113 §6.7)."""
    assert core.next_timer() == 10.0
    assert core.on_timer(9.0) == [] and core.data_to_send() == b""
    assert core.on_timer(10.0) == []
    assert core.data_to_send() == PingFrame(0, opaque_data=(1).to_bytes(8, "big")).serialize()
    assert core.next_timer() == 15.0


def test_no_answer_to_a_ping_loses_the_connection_and_its_streams(core) -> None:
    """Nothing within ping_timeout (5 s) of the PING: the connection is
    lost, and every open stream fails with it, long before an idle timeout."""
    (stream_id,) = open_streams(core, 1)
    core.on_timer(10.0)
    assert core.on_timer(14.0) == []
    events = core.on_timer(15.0)
    assert [type(e) for e in events] == [StreamFailed, ConnectionEnded]
    assert isinstance(events[0], StreamFailed) and events[0].stream_id == stream_id
    assert str(events[0].error) == "upstream did not answer a PING within 5 s"
    assert core.is_closed and core.next_timer() is None


def test_any_frame_proves_the_peer_alive(core) -> None:
    """Any frame after the PING (its ACK, or data) clears it: the next PING
    is an interval after that frame."""
    core.on_timer(10.0)
    core.data_to_send()
    ack = PingFrame(0, opaque_data=(1).to_bytes(8, "big"))
    ack.flags.add("ACK")
    core.receive(ack.serialize(), now=12.0)
    assert core.next_timer() == 22.0
    assert core.on_timer(15.0) == [] and not core.is_closed


# -- floods ----------------------------------------------------------------------

PING = PingFrame(0, opaque_data=b"flooding").serialize()
SETTINGS = SettingsFrame(0).serialize()


def ack_of(frame: bytes) -> bytes:
    """h2's acknowledgement of a PING or an empty SETTINGS frame."""
    ack = PingFrame(0, opaque_data=b"flooding") if frame == PING else SettingsFrame(0)
    ack.flags.add("ACK")
    return ack.serialize()


@pytest.mark.parametrize("frame", [PING, SETTINGS], ids=["PING", "SETTINGS"])
def test_as_many_acknowledgements_as_the_cap_in_one_read_are_sent(core, frame) -> None:
    """MAX_UNSENT_ACKS PING (or SETTINGS) frames in one read: each gets its
    ACK (RFC 9113 §6.7, §6.5.3), and the connection goes on."""
    (stream_id,) = open_streams(core, 1)
    core.receive(frame * MAX_UNSENT_ACKS, now=1.0)
    assert core.data_to_send() == ack_of(frame) * MAX_UNSENT_ACKS
    assert core.is_usable and core.active_streams == 1


@pytest.mark.parametrize("frame", [PING, SETTINGS], ids=["PING", "SETTINGS"])
def test_a_flood_past_the_cap_ends_the_connection_with_enhance_your_calm(core, frame) -> None:
    """One more in the same read: the peer is flooding (§10.5). The
    connection ends with GOAWAY(ENHANCE_YOUR_CALM) alone, none of the
    acknowledgements queued for the flood, and its stream fails as the
    connection lost (retried if it had no answer yet)."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(frame * (MAX_UNSENT_ACKS + 1), now=1.0)
    assert [type(e) for e in events[-2:]] == [StreamFailed, ConnectionEnded]
    assert isinstance(events[-2], StreamFailed) and events[-2].stream_id == stream_id
    assert type(events[-2].error) is ConnectionLost
    assert "flooded" in str(events[-2].error)
    assert core.data_to_send() == goaway(0, ErrorCodes.ENHANCE_YOUR_CALM)
    assert core.is_closed and core.active_streams == 0


def test_acknowledgements_count_across_reads_while_the_writer_is_paused(core) -> None:
    """The count restarts whenever the queued bytes go to a writer that is
    not paused: 600 PINGs a read go on for good. While the writer is paused
    they add up, and the second read of 600 ends the connection; once it has
    drained, the count starts again."""
    for _ in range(3):
        core.receive(PING * 600, now=1.0)
        assert core.data_to_send() == ack_of(PING) * 600
    core.pause_sending()
    core.receive(PING * 600, now=1.0)
    core.data_to_send()
    core.resume_sending()
    core.receive(PING * 600, now=1.0)
    assert not core.is_closed
    core.pause_sending()
    core.data_to_send()
    events = core.receive(PING * 600, now=1.0)
    assert [type(e) for e in events] == [ConnectionEnded] and core.is_closed
    assert core.data_to_send() == goaway(0, ErrorCodes.ENHANCE_YOUR_CALM)


# -- protocol errors -------------------------------------------------------------


def test_a_protocol_error_ends_the_connection_with_goaway(core) -> None:
    """A frame the protocol forbids (SETTINGS on a stream, RFC 9113 §6.5)
    is a connection error (§5.4.1): h2's GOAWAY(PROTOCOL_ERROR) is queued,
    and every stream fails as the connection lost, none as a protocol
    violation: none was malformed, and one not answered yet may be sent
    again."""
    first, second = open_streams(core, 2)
    events = core.receive(b"\x00\x00\x00\x04\x00\x00\x00\x00\x01", now=1.0)
    assert [type(e) for e in events] == [StreamFailed, StreamFailed, ConnectionEnded]
    assert [e.stream_id for e in events if isinstance(e, StreamFailed)] == [first, second]
    failed = [e for e in events if isinstance(e, StreamFailed | ConnectionEnded)]
    assert all(type(e.error) is ConnectionLost for e in failed)
    assert str(events[0].error).startswith("upstream connection ended by an HTTP/2 protocol error")
    (sent,) = frames_in(core.data_to_send())
    assert isinstance(sent, GoAwayFrame) and sent.error_code == ErrorCodes.PROTOCOL_ERROR
    assert core.is_closed


def assert_lost_to_a_protocol_error(
    core: H2ClientProtocol, events: list[Event], stream_id: int
) -> None:
    """The connection ended with GOAWAY(PROTOCOL_ERROR) and its one open
    stream, ``stream_id``, failed as the connection lost."""
    assert [type(e) for e in events] == [StreamFailed, ConnectionEnded]
    assert isinstance(events[0], StreamFailed) and events[0].stream_id == stream_id
    assert type(events[0].error) is ConnectionLost
    (sent,) = frames_in(core.data_to_send())
    assert isinstance(sent, GoAwayFrame) and sent.error_code == ErrorCodes.PROTOCOL_ERROR
    assert core.is_closed


def test_headers_opening_a_stream_from_the_server_end_the_connection(core, peer) -> None:
    """A server opens no stream with HEADERS (it reserves one with
    PUSH_PROMISE, RFC 9113 §8.4): HEADERS on stream 2 is a connection error
    (§5.4.1), GOAWAY(PROTOCOL_ERROR), and our stream fails as the
    connection lost."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(peer.headers(2), now=1.0)
    assert_lost_to_a_protocol_error(core, events, stream_id)


def test_our_settings_disable_server_push() -> None:
    """The client preface's SETTINGS carry ENABLE_PUSH 0 (RFC 9113 §6.5.2):
    the gateway reads no pushed response, so the server must push none
    (§8.4)."""
    core = H2ClientProtocol(authority="a", scheme="http", ping_interval=None, ping_timeout=5.0)
    core.initiate(now=0.0)
    sent = core.data_to_send()
    assert sent.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    (settings, *_) = frames_in(sent[24:])
    assert isinstance(settings, SettingsFrame)
    assert settings.settings[SettingsFrame.ENABLE_PUSH] == 0


def test_a_push_promise_ends_the_connection(core, peer) -> None:
    """With ENABLE_PUSH 0 sent and acknowledged, a PUSH_PROMISE is a
    connection error of type PROTOCOL_ERROR (RFC 9113 §6.5.2): GOAWAY, and
    the stream it came on fails as the connection lost. Accepted, each
    promise would reserve a stream that nobody reads and h2 keeps for the
    connection's life."""
    settings_ack = SettingsFrame(0)
    settings_ack.flags.add("ACK")
    core.receive(settings_ack.serialize(), now=0.0)
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id), now=1.0)
    promise = PushPromiseFrame(stream_id, promised_stream_id=2)
    promise.data = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", "upstream.test"), (":path", "/x")]
    )
    promise.flags.add("END_HEADERS")
    events = core.receive(promise.serialize(), now=1.0)
    assert_lost_to_a_protocol_error(core, events, stream_id)


MALFORMED_HEADS = {
    "no :status": [("content-type", "text/plain")],
    "status abc": [(":status", "abc")],
    "status 2_00": [(":status", "2_00")],
    "status 600": [(":status", "600")],
    "two :status": [(":status", "200"), (":status", "200")],
    "request pseudo-header": [(":status", "200"), (":path", "/")],
    "unknown pseudo-header": [(":status", "200"), (":custom", "x")],
    "pseudo after regular": [("content-type", "text/plain"), (":status", "200")],
    "upper case name": [(":status", "200"), ("Content-Type", "text/plain")],
    "connection": [(":status", "200"), ("connection", "keep-alive")],
    "transfer-encoding": [(":status", "200"), ("transfer-encoding", "chunked")],
    "te not trailers": [(":status", "200"), ("te", "gzip")],
    "value with white space": [(":status", "200"), ("x-id", " 1")],
    "empty name": [(":status", "200"), ("", "x")],
    "malformed informational": [(":status", "103"), ("Link", "</x>")],
}


@pytest.mark.parametrize("fields", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
def test_a_malformed_head_resets_its_stream_alone(core, peer, fields) -> None:
    """A malformed response (RFC 9113 §8.1.1: §8.2 and §8.3 broken) is a
    stream error (§5.4.2): RST_STREAM(PROTOCOL_ERROR) for that stream, which
    fails as a protocol violation; the connection and the stream answering
    next to it go on."""
    neighbour, malformed = open_streams(core, 2)
    core.receive(peer.headers(neighbour) + data(neighbour, b"before"), now=1.0)
    events = core.receive(peer.fields(malformed, fields), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, CapacityChanged]
    assert isinstance(events[0], StreamFailed) and events[0].stream_id == malformed
    assert type(events[0].error) is ProtocolViolation
    assert core.data_to_send() == rst(malformed, ErrorCodes.PROTOCOL_ERROR)
    assert core.release(malformed) == [] and core.data_to_send() == b""
    assert core.receive(data(neighbour, b"after", end_stream=True), now=1.0) == [
        DataReceived(neighbour, b"after"),
        StreamEnded(neighbour),
        CapacityChanged(),
    ]
    assert core.is_usable and not core.is_closed and core.active_streams == 0


def test_the_data_read_with_a_malformed_head_is_credited_at_once(core, peer) -> None:
    """DATA in the same bytes as the malformed head that failed its stream
    is nobody's to read: no event, and its credit goes back to the
    connection window at once (40,000 bytes: past half the window, so a
    WINDOW_UPDATE follows the RST_STREAM)."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(peer.fields(stream_id, [(":status", "abc")]) + data_of(stream_id, 40_000), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, CapacityChanged]
    # h2 sends the connection's WINDOW_UPDATE once half the window is
    # credited: at the second 16,384-byte frame.
    assert core.data_to_send() == rst(stream_id, ErrorCodes.PROTOCOL_ERROR) + window_update(0, 32_768)
    core.release(stream_id)
    assert core.data_to_send() == b""


def test_malformed_trailers_fail_the_stream(core, peer) -> None:
    """A trailer section with a pseudo-header (RFC 9113 §8.1) makes the
    response malformed: the stream fails instead of ending (it is closed on
    both sides already, so no RST_STREAM goes out)."""
    (stream_id,) = open_streams(core, 1)
    core.receive(peer.headers(stream_id) + data(stream_id, b"body"), now=1.0)
    events = core.receive(peer.fields(stream_id, [(":status", "200")], end_stream=True), now=1.0)
    assert [type(e) for e in events] == [StreamFailed, CapacityChanged]
    assert isinstance(events[0], StreamFailed) and type(events[0].error) is ProtocolViolation
    assert core.data_to_send() == b""
    assert core.is_usable


def test_a_well_formed_informational_head_and_trailers_pass(core, peer) -> None:
    """103 Early Hints, then the head, the body and trailers: only the
    final head, the body and the end are events."""
    (stream_id,) = open_streams(core, 1)
    events = core.receive(
        peer.fields(stream_id, [(":status", "103"), ("link", "</x>")])
        + peer.headers(stream_id)
        + data(stream_id, b"body")
        + peer.fields(stream_id, [("x-checksum", "1"), ("te", "trailers")], end_stream=True),
        now=1.0,
    )
    assert [type(e) for e in events] == [HeadReceived, DataReceived, StreamEnded, CapacityChanged]
    assert core.data_to_send() == b""


def test_window_updates_wake_body_senders(core) -> None:
    """WINDOW_UPDATE becomes WindowOpened, for a stream or the connection."""
    (stream_id,) = open_streams(core, 1)
    assert core.receive(window_update(stream_id, 10), now=1.0) == [WindowOpened(stream_id)]
    assert core.receive(window_update(0, 10), now=1.0) == [WindowOpened(0)]



def test_past_max_streams_the_connection_takes_no_more_and_closes_when_drained(peer) -> None:
    """A connection that has opened max_streams streams takes no new one;
    once they have ended it closes politely, like one after a GOAWAY."""
    core = H2ClientProtocol(
        authority="upstream.test", scheme="http", ping_interval=None, ping_timeout=5.0, max_streams=2
    )
    core.initiate(now=0.0)
    core.receive(SettingsFrame(0).serialize(), now=0.0)
    core.data_to_send()
    first, second = open_streams(core, 2)
    assert core.is_draining and not core.is_usable
    with pytest.raises(StreamRefused):
        core.start_request(REQUEST)
    core.receive(peer.headers(first, end_stream=True), now=1.0)
    events = core.receive(peer.headers(second, end_stream=True), now=1.0)
    assert events[-1] == ConnectionEnded(None)
    assert core.data_to_send().endswith(goaway(0))
