"""What every transport (HTTP/2 pool, HTTP/1.1 session) offers the layers above.

A transport opens one request and hands back a ``ResponseStream`` as soon as
the request is on the wire, before any answer: that is what lets the caller
reset it synchronously from the first moment (RFC 9113 §5.4.2, RST_STREAM).
Transports raise ``gateway.upstream.errors.TransportError``s only, and time
only their own waits (connecting, a free stream slot); how long an answer
may take is the caller's to decide (``gateway.upstream.source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    #: Path and query on the origin, e.g. ``/v1/chat/completions``.
    path: str
    #: Lower-case names; no pseudo-headers, no hop-by-hop headers.
    headers: Headers
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers
    #: "HTTP/2" or "HTTP/1.1": what the request actually went over.
    http_version: str

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class ResponseStream(Protocol):
    """One request in flight: its head, its body, and a synchronous reset."""

    async def head(self) -> ResponseHead:
        """Wait for the status line and headers. Once per stream: a stream
        need not keep the head after handing it over (every open stream
        would hold the headers)."""
        ...

    async def read(self) -> bytes:
        """The next piece of the body as it arrives, ``b""`` at its end.

        Flow-control credit is returned as the caller takes each piece, so a
        slow reader slows only its own stream (RFC 9113 §5.2). Safe to
        cancel: what has arrived stays buffered for the next read."""
        ...

    def reset(self) -> None:
        """Abandon the request now: the cancel reaches the wire before this
        returns (RST_STREAM written, or the HTTP/1.1 connection closed).
        Idempotent; a no-op once the response is complete."""
        ...

    def release(self) -> None:
        """The caller needs nothing more (it has the whole answer, or gives
        up on the rest): a finished response is given back as it is, an
        unfinished one is reset. Idempotent."""
        ...


class Transport(Protocol):
    async def open(self, request: UpstreamRequest) -> ResponseStream:
        """Send the request; return once it is written (not answered)."""
        ...

    def connection_count(self) -> int:
        """Open upstream connections, for gateway_upstream_connections."""
        ...

    async def aclose(self) -> None: ...
