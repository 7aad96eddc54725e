"""h2's trace line for each received frame is formatted only when written
(gateway/upstream/h2/h2_state.py, ``_FrameText``), and says what it said."""

from __future__ import annotations

import inspect
import re

import h2.config
import h2.connection
import hyperframe.frame

from gateway.upstream.h2.h2_state import GoawayTolerantH2Connection


class _RecordingLogger:
    """h2's logger interface: ``debug`` and ``trace`` with %-style arguments."""

    def __init__(self) -> None:
        self.args: list[tuple[object, ...]] = []
        self.lines: list[str] = []

    def debug(self, fmtstr: str, *args: object) -> None:
        pass

    def trace(self, fmtstr: str, *args: object) -> None:
        self.args.append(args)
        self.lines.append(fmtstr % args)


def _received(frames: list[hyperframe.frame.Frame]) -> _RecordingLogger:
    logger = _RecordingLogger()
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, logger=logger)
    connection = GoawayTolerantH2Connection(config=config)
    connection.initiate_connection()
    connection.receive_data(b"".join(frame.serialize() for frame in frames))
    return logger


def test_the_trace_line_reads_as_before() -> None:
    settings = hyperframe.frame.SettingsFrame(0)
    settings.settings[hyperframe.frame.SettingsFrame.MAX_CONCURRENT_STREAMS] = 7
    ping = hyperframe.frame.PingFrame(0, opaque_data=b"12345678")
    logger = _received([settings, ping])
    received = [line for line in logger.lines if line.startswith("Received frame: ")]
    assert received == [f"Received frame: {settings!r}", f"Received frame: {ping!r}"]


def test_nothing_is_formatted_until_a_line_is_written() -> None:
    logger = _received([hyperframe.frame.PingFrame(0, opaque_data=b"87654321")])
    frame_args = [args[0] for args in logger.args
                  if len(args) == 1 and str(args[0]).startswith("PingFrame(stream_id=0")]
    # What h2 hands its logger is the lazy text, not a str built beforehand.
    assert len(frame_args) == 1
    assert not isinstance(frame_args[0], str)


def test_that_trace_line_is_the_only_use_of_repr_in_h2_connection() -> None:
    """The shim rebinds ``repr`` for the whole of h2.connection, and its
    result is only right where it is formatted with %s: an h2 release that
    calls ``repr`` anywhere else there fails this, to be looked at."""
    source = inspect.getsource(h2.connection)
    assert re.findall(r"(?<![\w.])repr\(", source) == ["repr("]
    assert 'logger.trace("Received frame: %s", repr(frame))' in source
