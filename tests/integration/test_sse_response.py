"""The SSE response over a real socket: aiohttp-sse's hung-peer timeout is
set while a stream is open and restored after it, on a kept-alive connection."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.sse import PING, Keepalive, close_event_stream, open_event_stream

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
    set_timeout = EventSourceResponse._set_tcp_user_timeout

    def counted(self: EventSourceResponse, request: web.BaseRequest) -> None:
        sets.append(request)
        set_timeout(self, request)

    monkeypatch.setattr(EventSourceResponse, "_set_tcp_user_timeout", counted)

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
    assert before_second == before_first  # restored after the end
    assert len(sets) == 2  # once per stream: not again when aiohttp finishes the response
    assert len(keepalive) == 0
