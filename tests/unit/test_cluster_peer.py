"""The client side of the internal hop (gateway/cluster/peer.py), reading
from an aiohttp app in this process that answers as an owner's internal
listener does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from actors.deltas import Delta
from gateway.cluster.peer import STREAM_PATH, PeerClient
from gateway.cluster.wire import END_LINE, RemoteFailure, encode_delta, encode_deltas, error_line
from gateway.errors import UpstreamStatusError
from tests.integration.peer_server import serving as serving_raw
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


async def test_a_relay_cancelled_while_it_reads_the_end_of_the_answer_closes_it():
    """After the end line the relay reads the rest of the answer, so its
    connection can go back to the pool. Its last subscriber leaving then
    (the actor resets the source, a no-op by now, and cancels the read)
    must still close the response: the connection is not left to the
    garbage collector, held open against the owner."""
    body_ended = asyncio.Event()
    closed = asyncio.Event()

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # the request head
            line = encode_delta(1, Delta(text="a")) + END_LINE
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(line), line))
            await reader.readuntil(b"0\r\n\r\n")  # the heartbeat body's end
            body_ended.set()
            # The answer's end never comes; the relay's connection closing does.
            while await reader.read(65_536):
                pass
            closed.set()
        finally:
            writer.close()

    received: list[Delta] = []
    async with serving_raw(owner) as port:
        peers = PeerClient(secret="")
        try:
            source = await peers.follow(f"http://127.0.0.1:{port}", "k")
            assert source is not None

            async def relay() -> None:
                async for delta in source:
                    received.append(delta)

            reading = asyncio.create_task(relay())
            await body_ended.wait()  # the relay read the end line and waits for the answer's end
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            async with asyncio.timeout(5):
                await closed.wait()
        finally:
            await peers.aclose()
    assert [delta.text for delta in received] == ["a"]
