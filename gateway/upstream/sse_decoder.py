"""Incremental Server-Sent Events decoder: bytes in, events out (sans-IO).

It follows the WHATWG HTML Standard, §9.2.6 "Interpreting an event stream",
to the letter, because upstreams differ in the corners: CRLF, LF or a lone CR
as line ending, comments as keepalives, multi-line ``data``, a BOM, fields
without a colon. Body pieces arrive split at arbitrary byte boundaries (HTTP/2
DATA frames, TCP segments), so every state survives between ``feed`` calls.

Why the lines are split as *bytes* and decoded one field value at a time,
rather than running the whole stream through an incremental UTF-8 decoder:
CR (0x0D), LF (0x0A) and ``:`` (0x3A) never occur inside a multi-byte UTF-8
sequence, and an invalid sequence ends at the first of them. Cutting there and
decoding each piece with ``errors="replace"`` therefore yields exactly the
characters (including each U+FFFD, "maximal subpart" rule) that decoding the
whole stream would, and a character split across two chunks simply waits in
the partial line. It is also what makes the hot path fast: ``bytes.split`` on
whole chunks instead of a loop over characters.

Memory is bounded against a hostile upstream: a line, or the data of one
event, larger than ``max_event_bytes`` raises ``UpstreamProtocolError``.

One departure, asked for with ``error_lines``: llama.cpp's server writes a
failure in a stream as an ``error: {...}`` line, a field the standard
ignores (and then ``data: [DONE]``); such a line is then an ``error`` event
of its own, with the line's value as its data.
"""

from __future__ import annotations

from typing import NamedTuple

from gateway.errors import UpstreamProtocolError

_BOM = b"\xef\xbb\xbf"
_DATA_PREFIX = b"data: "
_MAX_RETRY_DIGITS = 18


class SSEEvent(NamedTuple):
    """One dispatched event.

    ``id`` is the stream's last event ID at dispatch time (the spec keeps it
    across events until an ``id`` field changes it); ``None`` when no ``id``
    field has been seen yet. ``retry`` is the reconnection time set by a
    ``retry`` field inside this event's block, if any.

    A named tuple, immutable all the same: one is built per upstream chunk,
    and a frozen dataclass's ``__init__`` (an ``object.__setattr__`` per
    field) was ~1.5 % of the gateway's CPU while relaying.
    """

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed body bytes as they arrive; get back the events they complete."""

    # Slots, as for every object an open stream holds: ~100 bytes less each
    # than an instance dict, times every idle stream.
    __slots__ = (
        "_max_event_bytes",
        "_error_lines",
        "_partial",
        "_partial_len",
        "_skip_lf",
        "_expect_bom",
        "_bom_prefix",
        "_data",
        "_data_len",
        "_event_type",
        "_event_retry",
        "_id_buffer",
        "_last_event_id",
        "_reconnection_time",
    )

    def __init__(self, *, max_event_bytes: int = 1 << 20, error_lines: bool = False) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max_event_bytes = max_event_bytes
        self._error_lines = error_lines
        # The line not yet terminated, kept as pieces so that a long line
        # arriving in many small chunks costs O(n), not O(n^2), to collect.
        self._partial: list[bytes] = []
        self._partial_len = 0
        # A CR ended the previous chunk: a LF opening the next one belongs to
        # the same CRLF line ending and must not count as an empty line.
        self._skip_lf = False
        # The UTF-8 decode step strips one leading BOM (WHATWG Encoding, "UTF-8 decode").
        self._expect_bom = True
        self._bom_prefix = b""
        # The spec's buffers for the event being assembled.
        self._data: list[bytes] = []
        self._data_len = 0
        self._event_type: bytes = b""
        self._event_retry: int | None = None
        self._id_buffer: str | None = None
        self._last_event_id: str | None = None
        self._reconnection_time: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """The last event ID string as of the last dispatch (for Last-Event-ID)."""
        return self._last_event_id

    @property
    def reconnection_time(self) -> int | None:
        """The latest valid ``retry`` value in milliseconds, if any was sent."""
        return self._reconnection_time

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume the next piece of the body; return the events it completes."""
        if self._skip_lf and data:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if self._expect_bom:
            data = self._strip_bom(data)
        if not data:
            return []
        if self._is_one_data_event(data):
            # What nearly every upstream chunk is (`data: {...}` and the empty
            # line): the event without the general line loop.
            self._last_event_id = self._id_buffer
            value = data[len(_DATA_PREFIX) : -2].decode("utf-8", "replace")
            return [SSEEvent("message", value, self._last_event_id, None)]
        if self._partial:
            if b"\n" not in data and b"\r" not in data:
                # Still inside one line: just collect the piece.
                self._keep_partial(data)
                return []
            data = b"".join(self._partial) + data
            self._partial.clear()
            self._partial_len = 0
        if b"\r" in data:
            # Normalise CRLF and lone CR to LF. A CR closing the chunk is a line
            # ending already; a LF opening the next chunk is then its second half.
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest:
            self._keep_partial(rest)
        if len(data) > self._max_event_bytes:
            for line in lines:
                if len(line) > self._max_event_bytes:
                    raise self._too_large("line")
        return self._process_lines(lines)

    def close(self) -> list[SSEEvent]:
        """The body ended. Per the spec, an event not terminated by an empty
        line is discarded, so this never dispatches; the decoder is then reset."""
        self._partial.clear()
        self._partial_len = 0
        self._skip_lf = False
        self._reset_event()
        return []

    # -- internals ----------------------------------------------------------

    def _strip_bom(self, data: bytes) -> bytes:
        """Drop one leading BOM, however the first bytes were split; until
        three bytes have arrived the decision waits in ``_bom_prefix``."""
        head = self._bom_prefix + data
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._bom_prefix = head
            return b""
        self._expect_bom = False
        self._bom_prefix = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _is_one_data_event(self, data: bytes) -> bool:
        """``data`` is one whole event of one ``data`` line, and nothing of
        another event is pending: it decodes to that line's value alone."""
        return (
            data.startswith(_DATA_PREFIX)
            and data.endswith(b"\n\n")
            and data.count(b"\n") == 2
            and b"\r" not in data
            and len(data) <= self._max_event_bytes
            and not self._partial
            and not self._data
            and not self._event_type
            and self._event_retry is None
        )

    def _keep_partial(self, piece: bytes) -> None:
        self._partial.append(piece)
        self._partial_len += len(piece)
        if self._partial_len > self._max_event_bytes:
            raise self._too_large("line")

    def _process_lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line.startswith(_DATA_PREFIX):
                # The common case (`data: {...}`), without the generic split.
                self._append_data(line[len(_DATA_PREFIX) :])
            elif line[0] != 0x3A:  # a line starting with ":" is a comment
                error = self._process_field(line)
                if error is not None:
                    events.append(error)
        return events

    def _process_field(self, line: bytes) -> SSEEvent | None:
        """One field line into the event being assembled; an ``error`` line
        (with ``error_lines``) is returned as its own event instead."""
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]  # exactly one leading space is part of the syntax
        if name == b"error" and self._error_lines:
            return SSEEvent("error", value.decode("utf-8", "replace"), self._last_event_id, None)
        if name == b"data":
            self._append_data(value)
        elif name == b"event":
            self._event_type = value
        elif name == b"id" and b"\x00" not in value:  # an id with NULL is ignored
            self._id_buffer = value.decode("utf-8", "replace")
        # bytes.isdigit: ASCII digits only, non-empty. Absurdly long values are
        # dropped: int() refuses > 4300 digits (CPython 3.11, CVE-2020-10735).
        elif name == b"retry" and value.isdigit() and len(value) <= _MAX_RETRY_DIGITS:
            self._event_retry = int(value)
            self._reconnection_time = self._event_retry
        # any other field name is ignored
        return None

    def _append_data(self, value: bytes) -> None:
        self._data.append(value)
        self._data_len += len(value) + 1
        if self._data_len > self._max_event_bytes:
            raise self._too_large("event")

    def _dispatch(self) -> SSEEvent | None:
        self._last_event_id = self._id_buffer
        if not self._data:
            # Empty data buffer: nothing to dispatch (the event type goes too).
            self._reset_event()
            return None
        # The spec appends "\n" after every data value and removes the final one.
        event = SSEEvent(
            event=self._event_type.decode("utf-8", "replace") or "message",
            data=b"\n".join(self._data).decode("utf-8", "replace"),
            id=self._last_event_id,
            retry=self._event_retry,
        )
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._data = []
        self._data_len = 0
        self._event_type = b""
        self._event_retry = None

    def _too_large(self, what: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(f"upstream SSE {what} exceeds {self._max_event_bytes} bytes")
