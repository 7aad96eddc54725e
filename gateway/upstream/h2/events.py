"""What the protocol core tells its adapter, one frozen dataclass per kind.

The core (``gateway.upstream.h2.protocol``) turns received bytes and clock
ticks into these; the asyncio adapter (``connection.py``) acts on them in
order: hand a stream its head, data, end or failure; wake a body sender;
tell the pool that capacity changed; close the transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.upstream.base import ResponseHead
from gateway.upstream.errors import TransportError


@dataclass(frozen=True, slots=True)
class Ready:
    """The server's preface (its first SETTINGS) arrived: streams may open
    (RFC 9113 §3.4)."""


@dataclass(frozen=True, slots=True)
class HeadReceived:
    stream_id: int
    head: ResponseHead


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes for a stream; its credit goes back once they are consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """END_STREAM: the body is complete."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """The stream will get nothing more: reset, refused, or its connection
    ended. A ``StreamRefused`` error means it was never processed."""

    stream_id: int
    error: TransportError


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Send window grew for a stream, or for all of them (``stream_id`` 0)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class CapacityChanged:
    """A stream slot came free, the peer's limits changed, or the connection
    stopped taking streams: the pool looks again."""


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The connection is over. ``error`` None: closed politely by us (GOAWAY
    sent, or drained after the peer's); else why it failed. Every stream
    still open was sent a ``StreamFailed`` before this."""

    error: TransportError | None


Event = (
    Ready
    | HeadReceived
    | DataReceived
    | StreamEnded
    | StreamFailed
    | WindowOpened
    | CapacityChanged
    | ConnectionEnded
)
