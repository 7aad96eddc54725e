"""HTTP/1.1 upstreams (vLLM, Ollama, llama.cpp, TGI) through aiohttp.

One request per connection at a time, so cancelling is closing: ``reset()``
drops the connection instead of returning it to the pool, and the server sees
the disconnect at once (uvicorn turns it into ``http.disconnect``).

aiohttp hands the response over only once its head has arrived, so the wait
for the head is timed here (``head_timeout``); reads are not timed here at
all: the caller owns the first-token and idle deadlines.

A connection is reused only once its response body has been read to its end
(RFC 9112 section 9.3). The answer's own terminator (``data: [DONE]``) usually
comes a write before that end (uvicorn and aiohttp send the last chunk of a
streamed body on its own), so a response released before its end is read to
it in the background, briefly and boundedly, rather than closed: otherwise
every streamed answer would cost a new connection (a TLS handshake, over
https).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from gateway.upstream.base import ResponseHead, UpstreamRequest
from gateway.upstream.errors import (
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
    TransportTimeout,
)
from gateway.upstream.origin import Origin

_READ_SIZE = 64 * 1024
#: How long, and how many bytes, a released response's rest is read for
#: before its connection is closed instead.
FINISH_TIMEOUT_S = 1.0
FINISH_MAX_BYTES = 64 * 1024


class Http1ResponseStream:
    """Implements ``gateway.upstream.base.ResponseStream`` over aiohttp."""

    __slots__ = ("_response", "_head", "_on_done", "_finish_later", "_closed")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        *,
        on_done: Callable[[], None],
        finish_later: Callable[[Http1ResponseStream], None],
    ) -> None:
        self._response = response
        self._on_done: Callable[[], None] | None = on_done
        self._finish_later: Callable[[Http1ResponseStream], None] | None = finish_later
        self._head = ResponseHead(
            status=response.status,
            headers=tuple((k.lower(), v) for k, v in response.headers.items()),
            http_version="HTTP/1.1",
        )
        # When its parser refuses bytes of a body (a chunk size that is not
        # hex, a chunk longer than its size: RFC 9112 §7.1), aiohttp closes
        # the connection but never ends the body: a read waiting then waits
        # for good, and one started later raises RuntimeError. The end of
        # the connection ends the body here instead.
        connection = response.connection
        protocol = None if connection is None else connection.protocol
        self._closed = None if protocol is None else protocol.closed
        if self._closed is not None:
            self._closed.remove_done_callback(_retrieve)
            self._closed.add_done_callback(_retrieve)
            self._closed.add_done_callback(self._connection_closed)

    async def head(self) -> ResponseHead:
        return self._head

    async def read(self) -> bytes:
        """The next piece of the body, ``b""`` at its end. aiohttp's buffer
        keeps what has arrived until it is read, so a cancelled read loses
        nothing."""
        try:
            data = await self._response.content.readany()
        except aiohttp.ClientError as exc:
            self.reset()
            raise ConnectionLost("upstream connection failed mid-response") from exc
        except ProtocolViolation:
            self.reset()
            raise
        if not data:
            self._response.release()
            self._done()
        return data

    def reset(self) -> None:
        # close(), not release(): the connection must not be reused for a
        # response that is still arriving; closing it is the cancel signal.
        self._response.close()
        self._done()

    def release(self) -> None:
        finish_later, self._finish_later = self._finish_later, None
        if self._on_done is None or finish_later is None:
            return  # already given back, reset, or being finished
        if self._response.content.at_eof():
            self._response.release()  # whole: the connection can be reused
            self._done()
        else:
            finish_later(self)

    async def finish(self) -> None:
        """Read the rest of a released response (within FINISH_TIMEOUT_S and
        FINISH_MAX_BYTES), then give its connection back, or close it if the
        rest did not come."""
        content = self._response.content
        try:
            async with asyncio.timeout(FINISH_TIMEOUT_S):
                left = FINISH_MAX_BYTES
                while left > 0 and (data := await content.readany()):
                    left -= len(data)
        except (TimeoutError, aiohttp.ClientError, ProtocolViolation):
            pass
        finally:
            if content.at_eof():
                self._response.release()
                self._done()
            else:
                self.reset()

    def _connection_closed(self, closed: asyncio.Future[None]) -> None:
        content = self._response.content
        if not content.is_eof() and content.exception() is None:
            # Ended neither by its length nor by aiohttp's own error for a
            # connection lost mid-body: its parser refused the bytes.
            content.set_exception(ProtocolViolation("upstream sent a malformed response body"))

    def _done(self) -> None:
        if self._closed is not None:
            self._closed.remove_done_callback(self._connection_closed)
            self._closed = None
        if self._on_done is not None:
            self._on_done()
            self._on_done = None


class _Http1Connector(aiohttp.TCPConnector):
    """aiohttp's connector, but a kept-alive connection that received bytes
    while idle is closed, not handed to the next request.

    No request was on it, so those bytes answer none (a late second
    response, a stray 408): aiohttp parses them and queues the response,
    and the next request sent on the connection would take it for its own
    answer (RFC 9112 §9.3: responses answer requests in order).
    """

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - the base class's signature
    ) -> Connection:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            connection.close()


def _retrieve(closed: asyncio.Future[None]) -> None:
    """A connection's end, taken note of: the error it ended with, if any,
    is the read's to report, not the loop's ("never retrieved")."""
    if not closed.cancelled():
        closed.exception()


class Http1Transport:
    """Implements ``gateway.upstream.base.Transport`` over HTTP/1.1."""

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float,
        head_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._origin = origin
        self._connect_timeout = connect_timeout
        self._head_timeout = head_timeout
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        # Connections busy with a response; idle keep-alive ones are not counted.
        self._in_flight = 0
        # Released responses whose rest is being read (Http1ResponseStream.finish).
        self._finishing: set[asyncio.Task[None]] = set()

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running loop.
        if self._session is None:
            connector = _Http1Connector(
                # Concurrency is bounded by the admission queue, not here.
                limit=0,
                ssl=self._ssl_context if self._ssl_context is not None else True,
            )
            self._session = aiohttp.ClientSession(
                base_url=self._origin.base_url,
                connector=connector,
                # The body is relayed as it arrives, never decompressed, so
                # the request asks for it as it is: aiohttp would otherwise
                # offer gzip and deflate, and a server or proxy that takes
                # the offer (nginx's gzip for text/event-stream) would send
                # a stream nothing here decodes (RFC 9110 §12.5.3).
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._connect_timeout, sock_read=None
                ),
            )
        return self._session

    def connection_count(self) -> int:
        return self._in_flight

    def _stream_done(self) -> None:
        self._in_flight -= 1

    def _finish_later(self, stream: Http1ResponseStream) -> None:
        task = asyncio.get_running_loop().create_task(stream.finish(), name="http1-finish")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def open(self, request: UpstreamRequest) -> Http1ResponseStream:
        session = self._get_session()
        try:
            async with asyncio.timeout(self._head_timeout):
                response = await session.request(
                    request.method,
                    request.path,
                    headers=dict(request.headers),
                    data=request.body or None,
                    # A 3xx is the upstream's answer, not a new address:
                    # following a 307/308 would send the prompt, and any
                    # key not in Authorization, to wherever Location says.
                    allow_redirects=False,
                )
        except aiohttp.ConnectionTimeoutError as exc:
            # aiohttp's own connect timeout. It is a TimeoutError as well, so
            # it comes before the branch for our deadline.
            raise TransportTimeout(f"connecting to {self._origin.authority} timed out") from exc
        except TimeoutError as exc:
            raise TransportTimeout("upstream sent no response headers in time") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConnectFailed(
                f"cannot connect to {self._origin.authority}: {exc.certificate_error}"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(f"cannot connect to {self._origin.authority}: {exc.os_error}") from exc
        except aiohttp.ClientResponseError as exc:
            # With redirects and raise_for_status off, aiohttp raises this
            # before a response only for bytes its parser refused (a bad
            # status line, an oversized or invalid header, both
            # Transfer-Encoding and Content-Length); it closes the
            # connection.
            raise ProtocolViolation("upstream sent a malformed response") from exc
        except aiohttp.ClientError as exc:
            raise ConnectionLost("upstream closed the connection before its response head") from exc
        self._in_flight += 1
        return Http1ResponseStream(
            response, on_done=self._stream_done, finish_later=self._finish_later
        )

    async def aclose(self) -> None:
        for task in self._finishing:
            task.cancel()
        if self._finishing:
            await asyncio.wait(self._finishing)
        if self._session is not None:
            await self._session.close()
            self._session = None

