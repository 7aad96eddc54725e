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
