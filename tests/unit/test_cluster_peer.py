"""The client side of the internal hop (gateway/cluster/peer.py), reading
from an aiohttp app in this process that answers as an owner's internal
listener does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from actors.deltas import Delta
from gateway.cluster.peer import STREAM_PATH, PeerClient
from gateway.cluster.wire import RemoteFailure, encode_deltas, error_line
from gateway.errors import UpstreamStatusError
from tests.loopback import serving


@asynccontextmanager
async def owner_answering(body: bytes) -> AsyncIterator[str]:
    """An owner whose stream for any key is ``body``, in one write (as the
    internal route sends its last lines with the end of the body)."""

    async def follow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write_eof(body)
        return response

    app = web.Application()
    app.router.add_get(STREAM_PATH + "{key}", follow)
    async with serving(app) as url:
        yield url


async def test_the_deltas_read_with_the_failure_reach_the_relay_before_it():
    body = encode_deltas([Delta(text="a"), Delta(text="b")]) + error_line(
        UpstreamStatusError(429, "slow down")
    )
    received: list[Delta] = []
    async with owner_answering(body) as url:
        peers = PeerClient(secret="")
        try:
            source = await peers.follow(url, "k")
            assert source is not None
            with pytest.raises(RemoteFailure) as raised:
                async for delta in source:
                    received.append(delta)
        finally:
            await peers.aclose()
    assert [delta.text for delta in received] == ["a", "b"]
    assert raised.value.code == "upstream_429"
