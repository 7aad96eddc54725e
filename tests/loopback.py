"""Loopback parts for tests: a stand-in peer (an aiohttp application on a
free loopback port), and how many writes a socket has received."""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` served for the block; yields its base URL (no trailing slash)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def event_stream_upstream(path: str, answer: Callable[[Mapping[str, Any]], bytes]) -> web.Application:
    """An upstream whose POST ``path`` answers ``text/event-stream`` with the
    bytes ``answer`` makes of the request's JSON body, in one write."""

    async def stream(request: web.Request) -> web.StreamResponse:
        body = answer(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(path, stream)
    return app


def data_segments_received(sock: socket.socket) -> int:
    """TCP segments with data this socket has received: ``tcpi_data_segs_in``
    of Linux's ``struct tcp_info`` (include/uapi/linux/tcp.h, since 4.6), at
    byte offset 152. On loopback each write of the sender is one segment."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int.from_bytes(info[152:156], sys.byteorder)
