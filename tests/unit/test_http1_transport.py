"""The HTTP/1.1 transport's error translation, each cause from the peer that
really causes it where one is cheap to run on loopback: a refused port, a
peer that never answers, one that closes without answering, the simulator
breaking a body off, an untrusted certificate.

aioresponses stands in only for aiohttp's connect timeout, which no loopback
peer provokes reliably (a SYN that is never answered needs a black-holed
route). aioresponses 0.7.9 cannot build a ClientResponse for aiohttp 3.14
(missing ``stream_writer``), so only its exception injection is used. Each
assertion names the message of the branch it means, so a test cannot pass
through a neighbouring ``except``."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aioresponses import aioresponses

from gateway.sim.content import answer_tokens
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.errors import ConnectFailed, ConnectionLost, TransportTimeout
from gateway.upstream.http1 import Http1Transport
from gateway.upstream.origin import Origin
from gateway.upstream.providers import get_provider
from tests.conftest import FAST_SIM_PROFILE, SimFactory
from tests.integration.conftest import until


def chat_request(prompt: str = "hello", **sim: object) -> UpstreamRequest:
    body = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = [("content-type", "application/json")]
    headers += [(f"x-sim-{k.replace('_', '-')}", str(v)) for k, v in sim.items()]
    return UpstreamRequest("POST", "/v1/chat/completions", tuple(headers), json.dumps(body).encode())


def answer(prompt: str, tokens: int) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


TransportFactory = Callable[..., Http1Transport]


@pytest.fixture
async def make_transport() -> AsyncIterator[TransportFactory]:
    """``make_transport(url, **options)``; every one closed at the end."""
    made: list[Http1Transport] = []

    def make(url: str, **options: object) -> Http1Transport:
        options = {"connect_timeout": 5.0, "head_timeout": 60.0, **options}
        transport = Http1Transport(Origin.parse(url), **options)  # type: ignore[arg-type]
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.aclose()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def raw_peer() -> AsyncIterator[Callable[[Callable[..., Awaitable[None]]], Awaitable[str]]]:
    """``await raw_peer(handler)``: a TCP server on loopback running
    ``handler(reader, writer)`` per connection; returns its ``/v1`` URL."""
    servers: list[asyncio.Server] = []

    async def start(handler: Callable[..., Awaitable[None]]) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def test_a_refused_port_is_a_connect_error(make_transport: TransportFactory) -> None:
    port = free_port()
    transport = make_transport(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(ConnectFailed) as info:
        await transport.open(chat_request())
    assert str(info.value).startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    assert isinstance(info.value.__cause__.os_error, ConnectionRefusedError)
    assert transport.connection_count() == 0


async def test_aiohttps_connect_timeout_is_a_timeout_naming_the_connect(
    make_transport: TransportFactory,
) -> None:
    """aiohttp's ConnectionTimeoutError is a TimeoutError too: it must reach
    its own branch, not the one for a missing response head."""
    transport = make_transport("http://upstream.test:8000/v1")
    with aioresponses() as mocked:
        mocked.post("http://upstream.test:8000/v1/chat/completions",
                    exception=aiohttp.ConnectionTimeoutError("Connection timeout to host"))
        with pytest.raises(TransportTimeout) as info:
            await transport.open(chat_request())
    assert str(info.value) == "connecting to upstream.test:8000 timed out"
    assert isinstance(info.value.__cause__, aiohttp.ConnectionTimeoutError)


async def test_a_peer_that_never_answers_times_out_on_the_head(
    make_transport: TransportFactory, raw_peer
) -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await done.wait()  # connected, request read, never a byte back
        writer.close()

    url = await raw_peer(silent)
    transport = make_transport(url, head_timeout=0.2)
    with pytest.raises(TransportTimeout) as info:
        await transport.open(chat_request())
    done.set()
    assert str(info.value) == "upstream sent no response headers in time"
    assert type(info.value.__cause__) is TimeoutError  # our deadline, not aiohttp's
    assert transport.connection_count() == 0


async def test_a_peer_that_closes_without_answering_is_a_lost_connection(
    make_transport: TransportFactory, raw_peer
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.close()

    transport = make_transport(await raw_peer(hang_up))
    with pytest.raises(ConnectionLost) as info:
        await transport.open(chat_request())
    assert str(info.value) == "upstream closed the connection before its response head"
    assert isinstance(info.value.__cause__, aiohttp.ServerDisconnectedError)
    assert transport.connection_count() == 0


async def test_the_simulators_goaway_refuse_over_http1_is_a_lost_connection(
    make_transport: TransportFactory, sim_factory: SimFactory
) -> None:
    """Over HTTP/1.1 the simulator's refusing GOAWAY is a connection closed
    before the response: the request never ran, so it is retryable."""
    sim = await sim_factory()
    transport = make_transport(sim.url)
    with pytest.raises(ConnectionLost) as info:
        await transport.open(chat_request("refused", goaway="refuse"))
    assert isinstance(info.value.__cause__, aiohttp.ServerDisconnectedError)
    # The next request gets a fresh connection and its whole answer.
    stream = await transport.open(chat_request("after the refusal"))
    decoder = get_provider("openai").decoder()
    deltas = []
    while data := await stream.read():
        deltas += decoder.feed(data)
    text = "".join(d.text for d in deltas + decoder.close())
    assert text == answer("after the refusal", FAST_SIM_PROFILE.tokens)
    assert transport.connection_count() == 0


async def test_a_body_broken_off_mid_stream_is_a_lost_connection(
    make_transport: TransportFactory, sim_factory: SimFactory
) -> None:
    """A read error with a real peer: the simulator aborts the connection
    after three tokens. What came before is delivered, then the error."""
    sim = await sim_factory()
    transport = make_transport(sim.url)
    stream = await transport.open(chat_request("broken off", reset_after=3))
    assert (await stream.head()).status == 200
    assert transport.connection_count() == 1
    received = b""
    with pytest.raises(ConnectionLost) as info:
        while True:
            received += await stream.read()
    assert str(info.value) == "upstream connection failed mid-response"
    assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)
    decoder = get_provider("openai").decoder()
    text = "".join(d.text for d in decoder.feed(received))
    assert text == answer("broken off", FAST_SIM_PROFILE.tokens)[: len(text)]
    assert transport.connection_count() == 0  # the broken connection is not counted


async def test_an_untrusted_certificate_is_a_certificate_error(
    make_transport: TransportFactory, sim_factory: SimFactory
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    sim = await sim_factory(ssl=context)
    transport = make_transport(sim.url)  # the system's trust store: the test CA is not in it
    with pytest.raises(ConnectFailed) as info:
        await transport.open(chat_request())
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
    assert isinstance(info.value.__cause__.certificate_error, ssl.SSLCertVerificationError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert sim.log.records == []


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def test_a_body_ended_after_its_terminator_keeps_the_connection(
    make_transport: TransportFactory, raw_peer
) -> None:
    """A framework writes a streamed body's last chunk after the answer's
    ``[DONE]``: the released response is read to that end in the background
    and its connection serves the next request."""
    connections = 0
    end_the_body = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            await read_request_head(reader)
            await reader.readexactly(len(chat_request().body))
            writer.write(_STREAM_HEAD + _chunk(b"data: [DONE]\n\n"))
            await end_the_body.wait()
            writer.write(b"0\r\n\r\n")
        await reader.read()  # until the transport closes
        writer.close()

    transport = make_transport(await raw_peer(peer))
    for _ in range(2):
        end_the_body.clear()
        stream = await transport.open(chat_request())
        assert await stream.read() == b"data: [DONE]\n\n"
        stream.release()
        assert transport.connection_count() == 1  # still busy: its end is awaited
        end_the_body.set()
        await until(lambda: transport.connection_count() == 0)
    assert connections == 1


async def test_a_body_whose_end_does_not_follow_closes_the_connection(
    make_transport: TransportFactory, raw_peer
) -> None:
    closed, released = asyncio.Event(), asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await reader.readexactly(len(chat_request().body))
        writer.write(_STREAM_HEAD + _chunk(b"data: [DONE]\n\n"))
        await released.wait()
        # More after the terminator than a released response is read for.
        writer.write(_chunk(b": padding\n\n" * 10_000))
        await reader.read()
        closed.set()
        writer.close()

    transport = make_transport(await raw_peer(peer))
    stream = await transport.open(chat_request())
    assert await stream.read() == b"data: [DONE]\n\n"
    stream.release()
    released.set()
    async with asyncio.timeout(5):
        await closed.wait()
    assert transport.connection_count() == 0
