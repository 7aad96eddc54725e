"""Upstream faults under a burst: 50 coalesced subscribers of one upstream
call, over HTTP/2 and HTTP/1.1. Every one ends with a clear in-stream error
and never ``[DONE]``; the failure is one upstream call, one warning line, one
count; the gauges go back to 0."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.integration.sse_frames import FrameReader

SUBSCRIBERS = 50

FAULTS = [
    # (sim directive, the code every subscriber ends with)
    ("fail_status=500", "upstream_500"),
    ("fail_status=429", "rate_limit_exceeded"),
    ("itl_ms=60000 tokens=3", "upstream_timeout"),  # stalls after its first token
    ("malformed_after=2", "upstream_protocol_error"),
    ("kill_after=2", "upstream_connection_lost"),
]


@pytest.mark.parametrize("protocol", ["h2c", "http1"])
@pytest.mark.parametrize(("directive", "code"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_every_coalesced_subscriber_ends_with_the_error(
    gateway_factory, protocol, directive, code
):
    gateway = await gateway_factory(upstream_protocol=protocol, upstream_idle_timeout_ms=300)
    prompt = f"burst under fault [sim ttft_ms=300 {directive}]"
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession() as http:

        async def one() -> list:
            async with http.post(gateway.v1 + "/chat/completions", json=body) as resp:
                assert resp.status == 200
                return await FrameReader(resp).rest()

        with capture_logs(processors=[merge_contextvars]) as logs:
            results = await asyncio.gather(*(one() for _ in range(SUBSCRIBERS)))
    for frames in results:
        assert all(frame.data != "[DONE]" for frame in frames)
        error = frames[-1].json()["error"]
        if code == "upstream_500":
            assert error["code"] in ("upstream_500", "server_error"), error
        else:
            assert error["code"] == code, error
        assert error["message"]
    # One upstream call for the burst. A killed connection may take its last
    # tokens with it (the kernel drops unread data at a RST): the gateway
    # then saw no token, and sends the request once more, for all of them.
    calls = len(gateway.sim.log.records)
    assert calls == 1 or (directive.startswith("kill_after") and calls == 2), calls
    failures = [line for line in logs if line["event"] == "upstream failed"]
    assert len(failures) == 1 and failures[0]["subscribers"] == SUBSCRIBERS
    async with asyncio.timeout(5):
        await gateway.state.registry.wait_idle()
    assert gateway.state.active_streams == 0
    assert gateway.state.admission.inflight == 0
    assert len(gateway.state.keepalive) == 0
