"""The drain and client connections, with ``python -m gateway`` as a process:
at SIGTERM idle keep-alive connections close at once, and a request still on
its way is answered 503 ``shutting_down`` with ``Connection: close``."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from tests.integration.test_client_connections import read_to_eof, split_response
from tests.integration.test_shutdown import (
    SLOW,
    gateway_process,
    idle_keepalive_connection,
    open_stream,
)


async def test_sigterm_closes_idle_connections_and_answers_late_requests_503(sim_factory):
    sim = await sim_factory()
    async with gateway_process(sim.url, DRAIN_TIMEOUT_S="20") as gateway, \
            aiohttp.ClientSession() as http:
        idle_reader, idle_writer = await idle_keepalive_connection(gateway.port)
        # A request on its way: its head is not complete when the signal comes.
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "late"}]})
        late_writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                          b"Content-Type: application/json\r\n")
        await late_writer.drain()
        stream = await open_stream(http, gateway.url + "/v1/stream", f"in flight {SLOW}")

        gateway.process.send_signal(signal.SIGTERM)
        draining = await gateway.wait_logged("draining")
        assert draining["idle_connections_closed"] == 1
        assert await read_to_eof(idle_reader, 5) == b""  # closed, no answer
        idle_writer.close()

        late_writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
        status, headers, raw = split_response(await read_to_eof(late_reader, 5))
        late_writer.close()
        assert status == 503
        assert headers["connection"] == "close"
        assert json.loads(raw) == {"error": {
            "message": "the gateway is shutting down; retry on another instance",
            "type": "server_error", "code": "shutting_down"}}

        async with asyncio.timeout(10):
            frames = await stream.rest()
            stream.response.release()
        assert frames[-1].event == "done"
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    assert [record.outcome for record in sim.log.records] == ["complete"]


async def test_a_hundred_streams_finish_in_the_drain_or_end_shutting_down(sim_factory):
    """Half the streams are short and finish inside the drain; the other half
    outlast it and end with the in-stream shutting_down error. Exit 0."""
    sim = await sim_factory()
    async with gateway_process(sim.url, DRAIN_TIMEOUT_S="1.5") as gateway, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        short = [f"short {n} [sim itl_ms=20 tokens=30]" for n in range(50)]
        long = [f"long {n} [sim itl_ms=100 tokens=200]" for n in range(50)]
        streams = await asyncio.gather(
            *(open_stream(http, gateway.url + "/v1/chat/completions", p) for p in short + long)
        )
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            for stream in streams:
                await stream.rest()
                stream.response.release()
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    for stream in streams[:50]:
        assert stream.frames[-1].raw == b"data: [DONE]\n\n"
    for stream in streams[50:]:
        assert stream.frames[-1].json()["error"]["code"] == "shutting_down"
        assert all(frame.data != "[DONE]" for frame in stream.frames)
    outcomes = sorted(record.outcome for record in sim.log.records)
    assert outcomes == ["complete"] * 50 + ["reset"] * 50
