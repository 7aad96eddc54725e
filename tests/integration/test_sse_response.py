"""The SSE response over a real socket: aiohttp-sse's hung-peer timeout is
set once while a stream is open and restored after it, on a kept-alive
connection; frames keep their order and framing when a slow client makes
them queue."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from gateway.sse import PING, Keepalive, _EventStream, close_event_stream, open_event_stream

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
pytestmark = pytest.mark.skipif(TCP_USER_TIMEOUT is None, reason="Linux only")


def _user_timeout(request: web.Request) -> int:
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT))


async def test_the_hung_peer_timeout_lasts_as_long_as_the_stream(aiohttp_client, monkeypatch):
    seen: list[tuple[str, int]] = []
    keepalive = Keepalive(60.0)
    sets = []
    set_timeout = _EventStream._hold_hung_peer_timeout

    def counted(self: _EventStream, request: web.BaseRequest) -> None:
        sets.append(request)
        set_timeout(self, request)

    monkeypatch.setattr(_EventStream, "_hold_hung_peer_timeout", counted)

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.append(("before", _user_timeout(request)))
        response = await open_event_stream(request, keepalive=keepalive)
        seen.append(("open", _user_timeout(request)))
        await close_event_stream(response, keepalive, b"data: end\n\n")
        return response

    app = web.Application()
    app.router.add_post("/s", stream)
    client = await aiohttp_client(app)
    for _ in range(2):  # the second request on the same kept-alive connection
        async with client.post("/s") as resp:
            assert await resp.read() == PING + b"data: end\n\n"
    assert [phase for phase, _ in seen] == ["before", "open", "before", "open"]
    before_first, open_first, before_second, _ = (value for _, value in seen)
    assert open_first == 120_000 != before_first  # aiohttp-sse's 120 s send timeout
    assert before_first == before_second == 0  # the kernel's default, restored after the end
    assert len(sets) == 2  # once per stream: not again when aiohttp finishes the response
    assert len(keepalive) == 0


def _dechunk(raw: bytes) -> bytes:
    """An HTTP/1.1 chunked body (RFC 9112 §7.1), strictly: any framing
    error raises."""
    body, rest = b"", raw
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return body
        body += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


async def test_frames_keep_their_order_and_framing_under_backpressure(aiohttp_server):
    """Frames written while nothing is queued for the socket, and while a
    slow client lets bytes queue (aiohttp's drain holds the writer back):
    the client gets every frame, whole, in order, in a valid chunked body."""
    keepalive = Keepalive(60.0)
    queued = asyncio.Event()
    paths = {"straight": 0, "queued": 0}
    sent: list[bytes] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        response = await open_event_stream(request, keepalive=keepalive)
        for i in range(5000):
            if request.transport.get_write_buffer_size():
                paths["queued"] += 1
                queued.set()  # the client starts reading only now
            else:
                paths["straight"] += 1
            frame = b"data: " + b"%06d" % i * 500 + b"\n\n"
            sent.append(frame)
            await response.write(frame)
            if paths["queued"] >= 20:
                break
        await close_event_stream(response, keepalive, b"data: end\n\n")
        return response

    app = web.Application()
    app.router.add_get("/s", stream)
    server = await aiohttp_server(app)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(30):
        await queued.wait()
        raw = await reader.read()  # to EOF: Connection: close
    writer.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert _dechunk(body) == PING + b"".join(sent) + b"data: end\n\n"
    assert paths["straight"] > 0 and paths["queued"] >= 20


async def _stream_to_a_tight_client(
    aiohttp_server, keepalive: Keepalive, frames: list[bytes], last_frame: bytes
) -> tuple[socket.socket, asyncio.Future[bool]]:
    """A stream writing ``frames``, then ``last_frame``, with 4 KiB socket
    buffers on both sides (so a client that does not read stalls the writes
    at once), and a client connected and asking for it; the future says
    whether the keepalive ended the stream as stalled."""
    ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def stream(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        response = await open_event_stream(request, keepalive=keepalive)
        try:
            for frame in frames:
                await response.write(frame)
            await close_event_stream(response, keepalive, last_frame)
        finally:
            ended.set_result(response.stalled)
        return response

    app = web.Application()
    app.router.add_get("/s", stream)
    server = await aiohttp_server(app)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, (server.host, server.port))
    await loop.sock_sendall(client, b"GET /s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    return client, ended


async def test_a_client_that_takes_none_of_the_last_frame_is_ended(aiohttp_server):
    """The last frame's write waits for its client like any other: one that
    takes none of it is ended once the write has waited the stall time, its
    connection closed, though the stream is no longer pinged."""
    keepalive = Keepalive(0.2, stall_s=0.3)
    async with keepalive.running():
        client, ended = await _stream_to_a_tight_client(
            aiohttp_server, keepalive, [], b"data: " + b"x" * (1 << 20) + b"\n\n")
        with client:
            async with asyncio.timeout(10):  # generous: the stall time is 0.3 s
                assert await ended is True
    assert len(keepalive) == 0


async def test_a_client_that_takes_a_long_write_slowly_is_not_ended(aiohttp_server):
    """Stalled means taking nothing: a client that reads a write longer than
    the stall time, but keeps taking bytes of it, gets all of it."""
    keepalive = Keepalive(0.2, stall_s=1.0)
    frame = b"data: " + b"x" * (1 << 19) + b"\n\n"
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with keepalive.running():
        client, ended = await _stream_to_a_tight_client(
            aiohttp_server, keepalive, [frame], b"data: end\n\n")
        with client:
            started = loop.time()
            async with asyncio.timeout(60):  # generous: a few seconds at this pace
                while chunk := await loop.sock_recv(client, 8192):
                    received.extend(chunk)
                    await asyncio.sleep(0.02)  # a few KB each time: seconds in all
            took = loop.time() - started
        assert await ended is False
    assert took > 1.0, took  # the write did outlast the stall time
    _, body = bytes(received).split(b"\r\n\r\n", 1)
    assert _dechunk(body) == PING + frame + b"data: end\n\n"
