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

from gateway.upstream.base import UpstreamRequest
from gateway.upstream.errors import ConnectFailed, ConnectionLost, TransportTimeout
from gateway.upstream.http1 import Http1Transport
from gateway.upstream.origin import Origin

URL = "http://upstream.test:8000/v1/chat/completions"
REQUEST = UpstreamRequest("POST", "/v1/chat/completions", (("content-type", "application/json"),),
                          b"{}")


@pytest.fixture
async def transport():
    transport = Http1Transport(
        Origin.parse("http://upstream.test:8000/v1"), connect_timeout=5.0, head_timeout=60.0
    )
    yield transport
    await transport.aclose()


async def test_connect_failure_is_a_connect_failure_naming_the_upstream(transport):
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ClientConnectorError(
            connection_key=None, os_error=ConnectionRefusedError(111, "refused")))  # type: ignore[arg-type]
        with pytest.raises(ConnectFailed, match="cannot connect to upstream.test:8000"):
            await transport.open(REQUEST)


async def test_aiohttps_connect_timeout_is_a_connect_timeout(transport):
    """ConnectionTimeoutError is a TimeoutError and a ClientError, not a
    ClientConnectorError: its own branch names the connect."""
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ConnectionTimeoutError("connect timed out"))
        with pytest.raises(TransportTimeout, match="connecting to upstream.test:8000 timed out"):
            await transport.open(REQUEST)


async def test_a_socket_read_timeout_is_a_head_timeout(transport):
    """aiohttp's ServerTimeoutError is a TimeoutError: the same branch as our
    own wait for the head."""
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ServerTimeoutError("read timed out"))
        with pytest.raises(TransportTimeout, match="no response headers in time"):
            await transport.open(REQUEST)


async def test_a_dropped_connection_is_a_lost_connection(transport):
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ServerDisconnectedError())
        with pytest.raises(ConnectionLost, match="before its response head"):
            await transport.open(REQUEST)
