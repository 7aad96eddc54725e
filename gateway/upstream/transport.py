"""Choosing the way out from UPSTREAM_URL and UPSTREAM_PROTOCOL.

| protocol | https://                         | http://                   |
|----------|----------------------------------|---------------------------|
| auto     | ALPN h2, else HTTP/1.1           | HTTP/1.1                  |
| h2       | ALPN h2 required                 | h2c, prior knowledge      |
| h2c      | (refused: h2c is cleartext)      | h2c, prior knowledge      |
| http1    | HTTP/1.1                         | HTTP/1.1                  |
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from gateway.upstream.base import ResponseStream, Transport, UpstreamRequest
from gateway.upstream.errors import ProtocolMismatch
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.http1 import Http1Transport
from gateway.upstream.origin import Origin, client_ssl_context

PROTOCOLS = ("auto", "h2", "h2c", "http1")


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """What the transports need; the defaults are the gateway's settings
    (``gateway.config.Settings``)."""

    max_connections: int
    #: TCP, TLS and, for HTTP/2, the peer's preface.
    connect_timeout: float
    #: HTTP/2: waiting for a stream slot and for window to send the body.
    #: HTTP/1.1: waiting for the response head, which aiohttp hands over
    #: only with the response.
    wait_timeout: float
    #: HTTP/2 liveness: a PING after this long without a frame...
    ping_interval: float | None
    #: ...and the connection counts as lost after this long without an answer.
    ping_timeout: float
    #: HTTP/2: streams one connection opens before the next one takes over.
    max_streams_per_connection: int | None
    #: For tests against a local TLS endpoint: a CA bundle to trust.
    cafile: str | None = None


def make_transport(origin: Origin, protocol: str, options: TransportOptions) -> Transport:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown upstream protocol {protocol!r}")
    if protocol == "h2c" and origin.is_tls:
        raise ValueError("h2c is HTTP/2 over cleartext; use h2 for an https:// upstream")

    def h2_pool(alpn: list[str]) -> H2Pool:
        context = client_ssl_context(alpn, options.cafile) if origin.is_tls else None
        return H2Pool(
            origin,
            max_connections=options.max_connections,
            connect_timeout=options.connect_timeout,
            slot_timeout=options.wait_timeout,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            max_streams_per_connection=options.max_streams_per_connection,
            ssl_context=context,
        )

    def http1(context: ssl.SSLContext | None) -> Http1Transport:
        return Http1Transport(
            origin,
            connect_timeout=options.connect_timeout,
            head_timeout=options.wait_timeout,
            ssl_context=context,
        )

    if protocol == "http1":
        return http1(client_ssl_context(["http/1.1"], options.cafile) if origin.is_tls else None)
    if protocol in ("h2", "h2c"):
        return h2_pool(["h2"])
    # auto
    if not origin.is_tls:
        return http1(None)
    return AlpnTransport(
        h2_pool(["h2", "http/1.1"]), http1(client_ssl_context(["http/1.1"], options.cafile))
    )


class AlpnTransport:
    """HTTP/2 while the server's ALPN says h2; HTTP/1.1 for good once it
    does not (a server does not change its mind between connections)."""

    def __init__(self, h2: H2Pool, http1: Http1Transport) -> None:
        self._h2 = h2
        self._http1 = http1
        self._use_http1 = False

    async def open(self, request: UpstreamRequest) -> ResponseStream:
        if not self._use_http1:
            try:
                return await self._h2.open(request)
            except ProtocolMismatch:
                self._use_http1 = True
        return await self._http1.open(request)

    def connection_count(self) -> int:
        return self._h2.connection_count() + self._http1.connection_count()

    async def aclose(self) -> None:
        await self._h2.aclose()
        await self._http1.aclose()
