"""The HTTP/1.1 front end: aiohttp's low-level server, one handler.

aiohttp parses and writes HTTP/1.1 (we never hand-write it); the handler only
adapts an aiohttp request to a ``SimRequest`` and a ``StreamResponse`` to a
``ResponseSink``. ``handler_cancellation=True``, as in the gateway: a client
that leaves cancels its handler at once, and the script logs "disconnect".
Over HTTP/1.1 "reset this response" can only mean aborting the connection.
"""

from __future__ import annotations

import asyncio
import weakref

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.sim.app import SimApp
from gateway.sim.log import Record
from gateway.sim.sink import Headers, PeerGone, SimRequest


class Http1Sink:
    def __init__(self, request: web.BaseRequest, connection_id: int) -> None:
        self._request = request
        self._connection_id = connection_id
        self._close_after = False
        #: The response, once its head went out.
        self.response: web.StreamResponse | None = None

    @property
    def http_version(self) -> str:
        return "HTTP/1.1"

    @property
    def connection_id(self) -> int:
        return self._connection_id

    def track(self, record: Record) -> None:
        # Nothing to do: a departing client cancels the handler task
        # (handler_cancellation), and the script logs that.
        pass

    async def send_head(self, status: int, headers: Headers, *, content_length: int | None = None) -> None:
        response = web.StreamResponse(status=status, headers=list(headers))
        if content_length is not None:
            response.content_length = content_length
        if self._close_after:
            response.force_close()  # "Connection: close", then close
        try:
            await response.prepare(self._request)
        except ConnectionResetError as exc:
            raise PeerGone("connection closed") from exc
        self.response = response

    async def send(self, data: bytes) -> None:
        assert self.response is not None, "send_head first"
        try:
            await self.response.write(data)
        except ConnectionResetError as exc:
            raise PeerGone("connection closed") from exc

    async def finish(self, data: bytes = b"") -> None:
        assert self.response is not None, "send_head first"
        try:
            await self.response.write_eof(data)
        except ConnectionResetError as exc:
            raise PeerGone("connection closed") from exc

    def reset(self) -> None:
        self._abort()

    def kill(self) -> None:
        self._abort()

    def goaway(self, *, refuse: bool) -> None:
        if refuse:
            transport = self._request.transport
            if transport is not None:
                transport.close()
        else:
            self._close_after = True

    def _abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


class Http1Frontend:
    """aiohttp's HTTP/1.1 server protocol factory, and its handlers in flight."""

    def __init__(self, app: SimApp) -> None:
        self._app = app
        self._server = web.Server(
            self._handle,
            request_factory=self._make_request,
            handler_cancellation=True,
            access_log=None,
        )
        self._handlers: set[asyncio.Task[object]] = set()
        # aiohttp's RequestHandler takes no attributes (slots, no weakref);
        # its transport does, and lives exactly as long as the connection.
        self._connection_ids: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = (
            weakref.WeakKeyDictionary()
        )

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # The same body limit as the HTTP/2 side (aiohttp's default is 1 MiB).
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=self._app.max_request_body
        )

    def protocol(self, transport: asyncio.BaseTransport, connection_id: int) -> RequestHandler:
        """The protocol for one connection (``connection_made`` not yet called)."""
        self._connection_ids[transport] = connection_id
        return self._server()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        transport = request.transport
        connection_id = self._connection_ids.get(transport, 0) if transport is not None else 0
        sink = Http1Sink(request, connection_id)
        try:
            await self._serve(request, sink)
        finally:
            self._handlers.discard(task)
        if sink.response is not None:
            return sink.response
        # Nothing was answered (the connection was refused or killed): this
        # placeholder meets aiohttp's contract and is never written.
        return web.Response(status=500)

    async def _serve(self, request: web.BaseRequest, sink: Http1Sink) -> None:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            await self._app.reject_too_large(sink)
            return
        sim_request = SimRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
        )
        await self._app.handle(sim_request, sink)

    def abort_all(self) -> None:
        for handler in self._server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    async def wait_closed(self) -> None:
        """Until every handler in flight has ended (after ``abort_all``)."""
        if self._handlers:
            await asyncio.wait(set(self._handlers))
