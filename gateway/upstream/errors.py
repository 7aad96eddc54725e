"""Why an upstream request failed, in the transport's own words.

The transports (HTTP/2 pool, HTTP/1.1 session) raise these, by cause, and
nothing else. They carry no HTTP status and no API error type: what a client
of the gateway is told is decided once, where the source translates them
(``gateway.upstream.source.gateway_error``).
"""

from __future__ import annotations


class TransportError(Exception):
    """Base: the request did not get a complete answer from the upstream."""


class ConnectFailed(TransportError):
    """No connection: refused, unreachable, name not resolved, TLS failed."""


class ProtocolMismatch(ConnectFailed):
    """TLS ALPN chose another protocol than HTTP/2 (RFC 7301)."""

    def __init__(self, message: str, *, negotiated: str | None) -> None:
        super().__init__(message)
        self.negotiated = negotiated


class ConnectionLost(TransportError):
    """The connection ended under the request (closed, reset, not answering
    PINGs, or a GOAWAY with an error code)."""


class StreamRefused(TransportError):
    """The upstream did not process the request: REFUSED_STREAM (RFC 9113
    §8.7), or a stream above a GOAWAY's last-stream-id (§6.8). Safe to send
    again."""


class StreamReset(TransportError):
    """The upstream (or we) reset the stream after it may have been processed."""

    def __init__(self, message: str, *, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class ProtocolViolation(TransportError):
    """The upstream broke the wire protocol (malformed HTTP/2 or HTTP/1.1)."""


class TransportTimeout(TransportError):
    """A wait the transport owns ran out: connecting, a stream slot, window
    for the request body, or an HTTP/1.1 response head."""
