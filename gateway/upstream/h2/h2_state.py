"""The sans-IO side of the HTTP/2 client: h2's state machine as we configure
it, and the translation of its events into our types and errors.

Kept apart from ``connection.py`` (the asyncio glue) so it can be read, and
reasoned about against RFC 9113, without any I/O in view.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from gateway.errors import UpstreamError, UpstreamStreamRefused, UpstreamStreamReset
from gateway.upstream.base import ResponseHead

#: We build our own request headers (lower-case names, no connection-specific
#: fields; RFC 9113 §8.2), so h2's outbound validation and normalisation --
#: a measurable share of the cost of opening a stream -- are skipped. What the
#: upstream sends us is still validated.
_H2_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class _FrameText:
    """``repr(frame)``, computed only when a log line is actually written.

    h2 formats every frame it receives for a trace line before its logger
    decides whether to write it (``H2Connection._receive_frame``:
    ``logger.trace("Received frame: %s", repr(frame))``), and its logger is a
    no-op unless configured otherwise. That formatting was ~6 % of the
    gateway's CPU per relayed chunk (tests/perf/PROFILES.md, 13). The name
    ``repr`` resolves in h2.connection's globals before the builtins, so
    binding it there to this class makes the line lazy; the text, when
    written, is the same.
    """

    __slots__ = ("_frame",)

    def __init__(self, frame: object) -> None:
        self._frame = frame

    def __str__(self) -> str:
        return repr(self._frame)

    __repr__ = __str__


h2.connection.repr = _FrameText  # type: ignore[attr-defined]


class GoawayTolerantH2Connection(h2.connection.H2Connection):
    """h2 closes its whole state machine when a GOAWAY arrives
    (python-hyper/h2#1181), so frames for the streams the GOAWAY lets finish
    (RFC 9113 §6.8: those at or below last_stream_id) would be rejected.
    Keep the state: this connection stops opening streams by itself."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return result


def new_client_state_machine() -> h2.connection.H2Connection:
    return GoawayTolerantH2Connection(config=_H2_CONFIG)


def response_head(raw_headers: list[tuple[bytes, bytes]]) -> ResponseHead:
    status = 0
    headers: list[tuple[str, str]] = []
    for name, value in raw_headers:
        if name == b":status":
            status = int(value)
        elif not name.startswith(b":"):
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return ResponseHead(status=status, headers=tuple(headers), http_version="HTTP/2")


def reset_error(error_code: int | None) -> UpstreamError:
    if error_code == ErrorCodes.REFUSED_STREAM:
        # RFC 9113 §8.7: REFUSED_STREAM means no application processing
        # happened, so the request may safely be sent again.
        return UpstreamStreamRefused("upstream refused the stream")
    return UpstreamStreamReset(f"upstream reset the stream ({code_name(error_code)})")


def code_name(error_code: int | None) -> str:
    if error_code is None:
        return "no error code"
    try:
        return ErrorCodes(error_code).name
    except ValueError:
        return f"error code {error_code}"
