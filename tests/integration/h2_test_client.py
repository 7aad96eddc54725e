"""A tiny asyncio HTTP/2 client, only for testing the simulator.

Deliberately minimal and transparent (not the gateway's pooled client): it
records every response head, body byte, RST_STREAM and GOAWAY per stream so
tests can assert on exactly what went over the wire. Received data is
acknowledged at once; request bodies are assumed to fit the peer's window.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes


class _GracefulGoawayConnection(h2.connection.H2Connection):
    """h2 closes its state machine on any GOAWAY (python-hyper/h2#1181), yet
    RFC 9113 §6.8 lets the streams up to last_stream_id finish: keep it open
    so tests can watch a graceful GOAWAY play out."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return result


@dataclass
class H2Exchange:
    """One stream as the client saw it."""

    stream_id: int
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    #: The error code of a RST_STREAM from the server.
    reset_code: int | None = None
    ended: bool = False
    #: Set when the stream ended, was reset, or the connection went.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set at every DATA frame (tests clear it to wait for the next one).
    data_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set by a RST_STREAM from the server (even after the stream ended).
    reset_received: asyncio.Event = field(default_factory=asyncio.Event)

    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


class H2TestClient(asyncio.Protocol):
    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = _GracefulGoawayConnection(config=config)
        self.transport: asyncio.Transport | None = None
        self.exchanges: dict[int, H2Exchange] = {}
        #: The server's GOAWAY, once received.
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.goaway_received = asyncio.Event()
        self.closed = asyncio.Event()
        self.settings_received = asyncio.Event()

    @classmethod
    async def connect(
        cls, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None
    ) -> H2TestClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            cls, host, port, ssl=ssl, server_hostname=host if ssl else None
        )
        await asyncio.wait_for(client.settings_received.wait(), 5)
        return client

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            match event:
                case h2.events.RemoteSettingsChanged():
                    self.settings_received.set()
                case h2.events.ResponseReceived():
                    exchange = self.exchanges[event.stream_id]
                    # header_encoding="utf-8": h2 hands out str pairs.
                    headers = {str(name): str(value) for name, value in event.headers}
                    exchange.status = int(headers.pop(":status"))
                    exchange.headers = headers
                case h2.events.DataReceived():
                    exchange = self.exchanges[event.stream_id]
                    exchange.body += event.data
                    exchange.data_arrived.set()
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                case h2.events.StreamEnded():
                    exchange = self.exchanges[event.stream_id]
                    exchange.ended = True
                    exchange.done.set()
                case h2.events.StreamReset():
                    exchange = self.exchanges[event.stream_id]
                    exchange.reset_code = event.error_code
                    exchange.reset_received.set()
                    exchange.done.set()
                case h2.events.ConnectionTerminated():
                    self.goaway = event
                    self.goaway_received.set()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        for exchange in self.exchanges.values():
            exchange.done.set()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- requests -------------------------------------------------------------------

    def start(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        end_stream: bool = True,
    ) -> H2Exchange:
        """Send a request (``end_stream=False``: leave the body unfinished);
        the exchange fills in as the answer arrives."""
        stream_id = self.conn.get_next_available_stream_id()
        exchange = H2Exchange(stream_id)
        self.exchanges[stream_id] = exchange
        block = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "sim")]
        block += list((headers or {}).items())
        self.conn.send_headers(stream_id, block, end_stream=end_stream and not body)
        frame = self.conn.max_outbound_frame_size
        for offset in range(0, len(body), frame):
            last = offset + frame >= len(body)
            self.conn.send_data(stream_id, body[offset : offset + frame], end_stream=end_stream and last)
        self._flush()
        return exchange

    def start_json(
        self, path: str, payload: Any, *, headers: dict[str, str] | None = None
    ) -> H2Exchange:
        all_headers = {"content-type": "application/json", **(headers or {})}
        return self.start("POST", path, headers=all_headers, body=json.dumps(payload).encode())

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> H2Exchange:
        exchange = self.start(method, path, headers=headers, body=body)
        await asyncio.wait_for(exchange.done.wait(), 5)
        return exchange

    async def post_json(
        self, path: str, payload: Any, *, headers: dict[str, str] | None = None
    ) -> H2Exchange:
        exchange = self.start_json(path, payload, headers=headers)
        await asyncio.wait_for(exchange.done.wait(), 5)
        return exchange

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """RST_STREAM, written before returning."""
        self.conn.reset_stream(stream_id, code)
        self._flush()

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.conn.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass  # the server already closed the HTTP/2 connection
            self.transport.close()
        await asyncio.wait_for(self.closed.wait(), 5)


# -- one request over either protocol ---------------------------------------------

PROTOCOLS = ("HTTP/1.1", "HTTP/2")


@dataclass
class Reply:
    status: int
    #: Lower-case names.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_over(
    protocol: str,
    port: int,
    method: str,
    path: str,
    *,
    payload: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One complete exchange with 127.0.0.1:``port`` on a fresh connection."""
    body = b"" if payload is None else json.dumps(payload).encode()
    all_headers = dict(headers or {})
    if payload is not None:
        all_headers["content-type"] = "application/json"
    if protocol == "HTTP/2":
        client = await H2TestClient.connect("127.0.0.1", port)
        try:
            exchange = await client.request(method, path, headers=all_headers, body=body)
        finally:
            await client.close()
        assert exchange.status is not None and exchange.ended, "the stream did not complete"
        return Reply(exchange.status, exchange.headers, bytes(exchange.body))
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://127.0.0.1:{port}{path}", data=body or None, headers=all_headers
        ) as response,
    ):
        assert response.version == aiohttp.HttpVersion11
        received = await response.read()
        headers_out = {name.lower(): value for name, value in response.headers.items()}
        return Reply(response.status, headers_out, received)
