"""Client connections: aiohttp's RequestHandler with what it leaves to us.

``ClientConnection`` is a subclass of ``web.RequestHandler`` (public API: its
constructor, ``handle_error``, ``finish_response``, ``close``/``force_close``
and asyncio's protocol methods). It adds:

- a header deadline: from a request's first byte to its dispatch, so a client
  sending its head one byte at a time is closed (aiohttp has none; its
  ``keepalive_timeout`` closes a connection idle *before* a request);
- half-close (RFC 9112 §9.6 lets a client end its side once the request is
  sent): EOF on read while a whole request is being answered keeps the
  connection open for the answer, which closes it. asyncio closes a
  transport when ``eof_received`` returns a false value, as aiohttp's
  does; here it returns True then. TCP cannot tell a half-close from a client that closed its
  socket, so the connection is probed: a harmless write right away and a
  few more soon after. To a gone client the first draws a RST and the next
  fails, which ends the request as a disconnect always has. A streaming
  response writes SSE pings; a response that has not started (a
  non-streaming answer) writes interim 100 (Continue) responses;
- the drain: ``Connections.close_idle()`` closes every connection not busy
  with a request, and while draining every response closes its connection
  (``Connection: close``);
- aiohttp's own error answers (a header over the size limit, a NUL in a
  header, a malformed request line) in the OpenAI error shape instead of
  text/plain.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import secrets
import socket
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import HttpVersion11, http_exceptions, web
from aiohttp.web import BaseRequest

from gateway.errors import GatewayError
from gateway.redact import redact

log = structlog.get_logger("gateway")

#: After a half-close, when to ping a streaming response (seconds from the
#: EOF). To a client that closed its socket the first ping draws a RST; the
#: next, one loop pass later, fails and ends the request (a RST on loopback is
#: back by then: ~0.3 ms from the EOF to the disconnect). The later ones
#: cover longer round trips.
PROBE_DELAYS = (0.0, 0.0, 0.001, 0.01, 0.1, 1.0)

#: The probe's write before a response has started: an interim response,
#: which an HTTP/1.1 client must parse and may ignore (RFC 9110 §15.2); 100
#: is the one that clients built on Python's http.client skip as well.
INTERIM_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: At most this many per request: Go's HTTP clients refuse more than five
#: interim responses before the final one.
MAX_INTERIM_RESPONSES = 5

#: The kernel's send buffer per client connection (Linux doubles it for its
#: bookkeeping). Fixed, not autotuned up to tcp_wmem's 4 MB: a client that
#: stops reading then holds at most this in the kernel, and its stream's
#: lag shows in the shared log where the lag bound sees it. 64 KiB still
#: carries 5 MB/s at a 100 ms round trip, far above any token stream.
CLIENT_SNDBUF = 64 * 1024

#: Connections the kernel may hold accepted before the loop takes them
#: (nginx: 511; asyncio's default 100 overflows under a burst, and with SYN
#: cookies a client's first bytes can then be lost).
LISTEN_BACKLOG = 1024

#: aiohttp's parser errors, in our words (the library's own text is logged).
_PARSER_WORDS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "a request line or header is too long"),
    (http_exceptions.BadHttpMethod, "the request method is not valid"),
    (http_exceptions.InvalidURLError, "the request target is not valid"),
    (http_exceptions.InvalidHeader, "a request header is not valid"),
    (http_exceptions.TransferEncodingError, "the chunked request body is not valid"),
    (http_exceptions.ContentLengthError, "the request's Content-Length is not valid"),
)


class Connections:
    """The open client connections of one listener, for the drain."""

    def __init__(self) -> None:
        self._open: set[ClientConnection] = set()
        #: Set at the start of the drain: every response closes its connection.
        self.draining = False
        #: While draining: set when the last request in progress has ended.
        self._quiet = asyncio.Event()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> int:
        """Connections with a request in progress or arriving."""
        return sum(1 for connection in self._open if not connection.idle)

    def add(self, connection: ClientConnection) -> None:
        self._open.add(connection)

    def discard(self, connection: ClientConnection) -> None:
        self._open.discard(connection)
        self.request_ended()

    def request_ended(self) -> None:
        """A connection's request ended (or the connection did). Only the
        drain looks at all of them: serving costs no scan."""
        if self.draining and self.busy == 0:
            self._quiet.set()

    async def wait_quiet(self) -> None:
        """Until no connection has a request in progress or arriving (a
        body still being uploaded included): what the drain waits for,
        beside the streams."""
        while self.busy:
            self._quiet.clear()
            await self._quiet.wait()

    def close_idle(self) -> int:
        """Close every connection with no request in progress or arriving;
        the rest close after their response. Returns how many closed now."""
        self.draining = True
        idle = [connection for connection in self._open if connection.idle]
        for connection in idle:
            connection.force_close()
        return len(idle)


class ClientConnection(web.RequestHandler):
    """One client connection (see the module docstring)."""

    # Slots: every open connection holds one, so its size is per-connection memory.
    __slots__ = (
        "_connections",
        "_header_timeout_s",
        "_header_deadline",
        "_busy_request",
        "_arriving",
        "_half_closed",
        "_ping",
        "_probe",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        connections: Connections,
        header_timeout_s: float,
        loop: asyncio.AbstractEventLoop,
        keepalive_timeout: float,
    ) -> None:
        # No access log (the middleware writes one line per request); aiohttp
        # takes None for that, as AppRunner(access_log=None) passes it.
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=keepalive_timeout,
            access_log=None,  # type: ignore[arg-type]
        )
        self._connections = connections
        self._header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None
        # A request is being handled (dispatched, response not yet written).
        self._busy_request: BaseRequest | None = None
        # Bytes of a request not yet dispatched have arrived.
        self._arriving = False
        self._half_closed = False
        self._ping: Callable[[], Awaitable[None]] | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return self._busy_request is None and not self._arriving

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.discard(self)
        self._stop_header_deadline()
        self._stop_probe()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._busy_request is None:
            self._arriving = True
            if self._header_deadline is None:
                self._header_deadline = asyncio.get_running_loop().call_later(
                    self._header_timeout_s, self._header_timed_out
                )
        super().data_received(data)

    # asyncio.Protocol's contract (True keeps the transport open for
    # writing); aiohttp annotates its own, which never does, as -> None.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        request = self._busy_request
        if request is not None and not request.content.is_eof():
            return None  # the body can never be completed: a disconnect
        if request is None and not self._arriving:
            return None  # idle: the client is done with this connection
        # A whole request (or one about to be dispatched): answer it, then
        # close. The header deadline still bounds one that never completes.
        self._half_closed = True
        if request is not None:
            self.close()
            self._start_probe()
        return True

    # -- what the gateway's handlers tell it ---------------------------------------

    def request_started(self, request: BaseRequest) -> None:
        """The middleware has the request: its head is complete."""
        self._busy_request = request
        self._arriving = False
        self._stop_header_deadline()
        if self._half_closed:
            if not request.content.is_eof():
                self.force_close()  # half a body and EOF: it cannot complete
                return
            self.close()
            self._start_probe()

    def probe_with(self, ping: Callable[[], Awaitable[None]]) -> None:
        """How to find out whether a half-closed client is still there: a
        harmless write into the response (an SSE comment)."""
        self._ping = ping
        if self._half_closed:
            self._start_probe()

    def probe_before_answer(self, request: BaseRequest) -> None:
        """``probe_with`` for a response that writes nothing before it is
        whole (a non-streaming answer): interim 100 (Continue) responses.
        An HTTP/1.0 client may get no 1xx (RFC 9110 §15.2), so it is not
        probed."""
        if request.version < HttpVersion11:
            return
        writer = request.writer
        sent = 0

        async def interim() -> None:
            nonlocal sent
            transport = self.transport
            # Nothing while bytes wait to go: a write would add to them, not
            # tell anything, and could wait on the drain.
            if (sent == MAX_INTERIM_RESPONSES or transport is None or transport.is_closing()
                    or transport.get_write_buffer_size()):
                return
            sent += 1
            try:
                await writer.write(INTERIM_RESPONSE)
            except ConnectionResetError:
                pass  # gone: the connection's loss cancels the request

        self.probe_with(interim)

    # -- aiohttp's RequestHandler ------------------------------------------------------

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException):
            # Raised before the middleware ran (the envelope translates every
            # other): the route's Expect check, answered as the parser's are.
            resp = self.handle_error(request, resp.status, resp)
        # A body that stalled, or whose framing or content coding broke
        # (its reader holds the error): where a next request would start is
        # unknown (RFC 9112 §9.3). aiohttp would read on past the answer and
        # log that error again as unhandled.
        unreadable = resp.status == 408 or request.content.exception() is not None
        if self._connections.draining or self._half_closed or unreadable:
            resp.force_close()  # Connection: close, and closed after it
        # The handler is done: no probe write may follow (or, an interim
        # response, come after) what aiohttp writes now.
        self._ping = None
        self._stop_probe()
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._busy_request = None
            self._connections.request_ended()
            if unreadable:
                # The body stalled or is broken: close now, rather than
                # linger reading it.
                self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own error answers (parser errors, a handler that
        escaped the middleware) in the OpenAI error shape, logged once."""
        if request.writer.output_size > 0:
            # As aiohttp's: some of a response has gone, no other can follow.
            raise ConnectionError("response already started; cannot send an error")
        error = _error_for(status, exc)
        # The id the client is given names this line too.
        request_id = secrets.token_hex(12)
        log.log(
            30 if status >= 500 else 20,
            "request refused by the HTTP parser" if status < 500 else "request failed",
            request_id=request_id,
            status=status,
            error=error.code,
            detail=redact(f"{type(exc).__name__}: {message or exc}") if exc else message,
            client=request.remote,
        )
        resp = web.json_response(error.to_json(), status=status)
        resp.headers["X-Request-Id"] = request_id
        resp.force_close()
        return resp

    # -- internals ---------------------------------------------------------------------

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self._busy_request is None and self._arriving:
            log.info("request head timed out", timeout_s=self._header_timeout_s,
                     client=self.peername[0] if isinstance(self.peername, tuple) else None)
            self.force_close()

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _start_probe(self) -> None:
        if self._ping is not None and self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(
                self._run_probe(self._ping), name="half-close-probe"
            )

    async def _run_probe(self, ping: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for delay in PROBE_DELAYS:
            await asyncio.sleep(max(0.0, started + delay - loop.time()))
            await ping()

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None


def _error_for(status: int, exc: BaseException | None) -> GatewayError:
    if isinstance(exc, web.HTTPExpectationFailed):
        # RFC 9110 section 10.1.1: an expectation the server cannot meet.
        error = GatewayError(
            "the gateway meets no expectation but 100-continue", code="expectation_failed"
        )
        error.status, error.type = status, "invalid_request_error"
        return error
    if status >= 500:
        error = GatewayError("internal error", code="internal_error")
        if status == 504:
            error = GatewayError("the request timed out", code="timeout")
            error.type = "timeout_error"
        error.status = status
        return error
    words = "the request is not valid HTTP/1.1"
    for cls, text in _PARSER_WORDS:
        if isinstance(exc, cls):
            words = text
            break
    error = GatewayError(words, code="invalid_http")
    error.status, error.type = status, "invalid_request_error"
    return error


def client_connection(request: web.Request) -> ClientConnection | None:
    protocol = request.protocol
    return protocol if isinstance(protocol, ClientConnection) else None


def listen_url(host: str, port: int) -> str:
    """The base URL of a listening address (an IPv6 one in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ListenError(Exception):
    """A listening socket could not be opened (the port is taken, or not ours
    to take): one line for the operator, naming the setting to change."""

    @classmethod
    def from_os_error(
        cls, exc: OSError, host: str, port: int, *, setting: str = "GATEWAY_PORT",
        host_setting: str = "GATEWAY_HOST",
    ) -> ListenError:
        # The address, not the port: a name that does not resolve, or an
        # address that is not this host's (or not yet: an interface coming up).
        if isinstance(exc, socket.gaierror):
            return cls(f"address {host} cannot be listened on: {exc.strerror or exc}; "
                       f"choose another with {host_setting}")
        if exc.errno == errno.EADDRNOTAVAIL:
            return cls(f"address {host} cannot be listened on: it is not an address of this "
                       f"host; choose another with {host_setting}")
        if exc.errno == errno.EADDRINUSE:
            why = "is already in use (another gateway, or an old one still draining?)"
        elif exc.errno == errno.EACCES:
            why = "needs privileges this process does not have"
        else:
            why = f"cannot be opened: {exc.strerror or exc}"
        return cls(f"port {port} on {host} {why}; choose another with {setting}")


class Listener:
    """A listening socket whose connections are ``ClientConnection``s of an
    AppRunner's server (set up, not started on a site of aiohttp's)."""

    def __init__(
        self,
        runner: web.AppRunner,
        *,
        idle_timeout_s: float,
        header_timeout_s: float,
    ) -> None:
        self._runner = runner
        self._idle_timeout_s = idle_timeout_s
        self._header_timeout_s = header_timeout_s
        self.connections = Connections()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen; ``reuse_port`` lets the workers of one supervisor share
        the port (SO_REUSEPORT: the kernel spreads connections over them)."""
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        assert manager is not None, "runner.setup() first"

        # A partial, as aiohttp's Server is: the loop builds each connection.
        connection = functools.partial(
            ClientConnection,
            manager,
            connections=self.connections,
            header_timeout_s=self._header_timeout_s,
            loop=loop,
            keepalive_timeout=self._idle_timeout_s,
        )
        self._server = await loop.create_server(
            connection, host, port, reuse_address=True, reuse_port=reuse_port or None,
            backlog=LISTEN_BACKLOG,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        """New connections are refused from here on."""
        if self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        """Stop listening; call after the runner's cleanup closed the
        connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
