"""The HTTP/1.1 transport's error translation, with aioresponses standing in
for the network (the real-socket path, status and body included, is in
tests/integration/test_upstream_protocols.py). aioresponses 0.7.9 cannot build
a ClientResponse for aiohttp 3.14 (missing ``stream_writer``), so only its
exception injection is used here -- which is what is hard to get from a real
peer anyway."""

from __future__ import annotations

import aiohttp
import pytest
from aioresponses import aioresponses

from gateway.errors import UpstreamConnectError, UpstreamConnectionLost, UpstreamTimeout
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.http1 import Http1Transport
from gateway.upstream.origin import Origin

URL = "http://upstream.test:8000/v1/chat/completions"
REQUEST = UpstreamRequest("POST", "/v1/chat/completions", (("content-type", "application/json"),),
                          b"{}")


@pytest.fixture
async def transport():
    transport = Http1Transport(Origin.parse("http://upstream.test:8000/v1"))
    yield transport
    await transport.aclose()


async def test_connect_failure_is_an_upstream_connect_error(transport):
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ClientConnectorError(
            connection_key=None, os_error=ConnectionRefusedError(111, "refused")))  # type: ignore[arg-type]
        with pytest.raises(UpstreamConnectError) as info:
            await transport.open(REQUEST)
    assert info.value.status == 502 and info.value.retryable
    assert "upstream.test:8000" in info.value.message


async def test_timeout_and_lost_connection_are_translated(transport):
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ServerTimeoutError("read timed out"))
        with pytest.raises(UpstreamTimeout) as timeout:
            await transport.open(REQUEST)
        assert timeout.value.status == 504
        mocked.post(URL, exception=aiohttp.ServerDisconnectedError())
        with pytest.raises(UpstreamConnectionLost):
            await transport.open(REQUEST)
