"""``SimServer``: one listening port, HTTP/1.1 and HTTP/2 on it.

Every accepted connection starts with a sniffer that reads until the first
bytes decide: the HTTP/2 client preface (prior knowledge, RFC 9113 §3.3)
hands the connection to the h2 protocol, anything else to aiohttp's HTTP/1.1
protocol, each getting the bytes already read. Under TLS the sniffing happens
after the handshake, so it works the same whatever ALPN agreed on.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl as ssl_module
from collections.abc import Callable
from types import TracebackType
from typing import cast

from gateway.sim.app import SimApp
from gateway.sim.h2_server import PREFACE, H2ServerProtocol
from gateway.sim.http1 import Http1Frontend
from gateway.sim.log import RequestLog
from gateway.sim.profile import SimProfile

#: Makes the protocol that takes over a connection: (transport, connection id).
ProtocolFactory = Callable[[asyncio.Transport, int], asyncio.Protocol]


class _ProtocolSniffer(asyncio.Protocol):
    """The first protocol of every connection, until its first bytes are read."""

    def __init__(
        self,
        connection_id: int,
        undecided: set[_ProtocolSniffer],
        make_h2: ProtocolFactory,
        make_http1: ProtocolFactory,
    ) -> None:
        self._connection_id = connection_id
        self._undecided = undecided
        self._make_h2 = make_h2
        self._make_http1 = make_http1
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._undecided.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head = bytes(self._buffer[: len(PREFACE)])
        if not PREFACE.startswith(head):
            self._hand_over(self._make_http1)
        elif len(head) == len(PREFACE):
            self._hand_over(self._make_h2)
        # else: a prefix of the preface so far; wait for more

    def connection_lost(self, exc: Exception | None) -> None:
        self._undecided.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self, make_protocol: ProtocolFactory) -> None:
        transport = self._transport
        assert transport is not None
        self._undecided.discard(self)
        protocol = make_protocol(transport, self._connection_id)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self._buffer))


class SimServer:
    """The simulated upstream, in process.

    ``async with SimServer(profile) as sim:`` starts it on 127.0.0.1 with a
    free port; ``sim.url`` is the base URL to configure (``.../v1``) and
    ``sim.log`` the request log.
    """

    def __init__(self, profile: SimProfile | None = None, *, log: RequestLog | None = None) -> None:
        self.profile = profile if profile is not None else SimProfile()
        self.log = log if log is not None else RequestLog()
        self.app = SimApp(self.profile, self.log)
        self.host = ""
        self.port = 0
        self._scheme = "http"
        self._server: asyncio.Server | None = None
        self._http1: Http1Frontend | None = None
        self._sniffers: set[_ProtocolSniffer] = set()
        self._h2_connections: set[H2ServerProtocol] = set()
        self._connection_ids = itertools.count(1)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl: ssl_module.SSLContext | None = None
    ) -> None:
        """Listen on ``host``:``port`` (0: any free port; use an address, not
        a name that resolves to several, or each gets a different port)."""
        if self._server is not None:
            raise RuntimeError("SimServer already started")
        self._http1 = Http1Frontend(self.app)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ProtocolSniffer(
                next(self._connection_ids), self._sniffers, self._h2_protocol, self._http1_protocol
            ),
            host,
            port,
            ssl=ssl,
        )
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        self._scheme = "https" if ssl is not None else "http"

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT`` (https under TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self._scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL of the API, ``http://127.0.0.1:PORT/v1``."""
        return self.origin + "/v1"

    async def aclose(self) -> None:
        """Stop listening, drop every connection, and await every request task."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for sniffer in list(self._sniffers):
            sniffer.abort()
        connections = list(self._h2_connections)
        for connection in connections:
            connection.abort()
        assert self._http1 is not None
        self._http1.abort_all()
        await asyncio.gather(*(connection.wait_closed() for connection in connections))
        await self._http1.wait_closed()
        await server.wait_closed()

    async def __aenter__(self) -> SimServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- protocol factories for the sniffer ---------------------------------------

    def _h2_protocol(self, transport: asyncio.Transport, connection_id: int) -> asyncio.Protocol:
        connection = H2ServerProtocol(self.app, connection_id, on_closed=self._h2_connections.discard)
        self._h2_connections.add(connection)
        return connection

    def _http1_protocol(self, transport: asyncio.Transport, connection_id: int) -> asyncio.Protocol:
        assert self._http1 is not None
        return self._http1.protocol(transport, connection_id)
