"""TLS with ALPN, the auto fallback to HTTP/1.1, and the HTTP/1.1 path,
each against the simulator over real sockets."""

from __future__ import annotations

import dataclasses
import json
import ssl
import time

import pytest
import trustme
from aiohttp import web

from gateway.config import Settings
from gateway.routing.setup import transport_options
from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from gateway.upstream.base import ResponseStream, UpstreamRequest
from gateway.upstream.errors import ConnectFailed, ProtocolMismatch
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.http1 import Http1Transport
from gateway.upstream.origin import Origin
from gateway.upstream.providers import get_provider
from gateway.upstream.transport import AlpnTransport, TransportOptions, make_transport
from tests.loopback import serving

FAST = SimProfile(ttft_ms=2, ttft_jitter_ms=0, itl_ms=0, itl_jitter_ms=0, tokens=12)


def request(prompt: str, **sim: object) -> UpstreamRequest:
    body = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
    headers = [("content-type", "application/json")]
    headers += [(f"x-sim-{k.replace('_', '-')}", str(v)) for k, v in sim.items()]
    return UpstreamRequest("POST", "/v1/chat/completions", tuple(headers), json.dumps(body).encode())


async def text_of(stream: ResponseStream) -> str:
    decoder = get_provider("openai").decoder()
    deltas = []
    while data := await stream.read():
        deltas += decoder.feed(data)
    deltas += decoder.close()
    return "".join(d.text for d in deltas)


def options(**overrides: object) -> TransportOptions:
    """The gateway's defaults, with ``overrides``."""
    return dataclasses.replace(transport_options(Settings()), **overrides)  # type: ignore[arg-type]


def expected(prompt: str) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], FAST.tokens))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    context.set_alpn_protocols(alpn)
    return context


async def test_tls_alpn_h2_is_used_when_the_server_offers_it(sim_factory, ca, ca_file):
    sim = await sim_factory(FAST, ssl=server_context(ca, ["h2", "http/1.1"]))
    assert sim.url.startswith("https://")
    transport = make_transport(Origin.parse(sim.url), "auto", options(cafile=ca_file))
    try:
        assert isinstance(transport, AlpnTransport)
        stream = await transport.open(request("over tls"))
        assert (await stream.head()).http_version == "HTTP/2"
        assert await text_of(stream) == expected("over tls")
        (record,) = await sim.log.wait_for(1, outcome="complete")
        assert record.http_version == "HTTP/2"
    finally:
        await transport.aclose()


async def test_auto_falls_back_to_http1_when_alpn_says_so(sim_factory, ca, ca_file):
    sim = await sim_factory(FAST, ssl=server_context(ca, ["http/1.1"]))
    transport = make_transport(Origin.parse(sim.url), "auto", options(cafile=ca_file))
    try:
        for prompt in ("first", "second"):
            stream = await transport.open(request(prompt))
            assert (await stream.head()).http_version == "HTTP/1.1"
            assert await text_of(stream) == expected(prompt)
        records = await sim.log.wait_for(2, outcome="complete")
        assert {r.http_version for r in records} == {"HTTP/1.1"}
    finally:
        await transport.aclose()


async def test_h2_required_refuses_a_server_without_h2(sim_factory, ca, ca_file):
    sim = await sim_factory(FAST, ssl=server_context(ca, ["http/1.1"]))
    transport = make_transport(Origin.parse(sim.url), "h2", options(cafile=ca_file))
    try:
        assert isinstance(transport, H2Pool)
        with pytest.raises(ProtocolMismatch) as info:
            await transport.open(request("needs h2"))
        # No common protocol: OpenSSL selects none (a server may also pick http/1.1).
        assert info.value.negotiated in (None, "http/1.1")
        assert sim.log.records == []  # not a single HTTP/2 byte reached it
    finally:
        await transport.aclose()


async def test_an_untrusted_certificate_is_refused(sim_factory, ca):
    sim = await sim_factory(FAST, ssl=server_context(ca, ["h2"]))
    transport = make_transport(Origin.parse(sim.url), "h2", options())
    try:
        with pytest.raises(ConnectFailed) as info:
            await transport.open(request("untrusted"))
        # The certificate check refused it, not any other connect failure.
        assert isinstance(_root_cause(info.value), ssl.SSLCertVerificationError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert sim.log.records == []
    finally:
        await transport.aclose()


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


async def test_http1_streams_exactly_and_reset_closes_the_connection(sim_factory):
    sim = await sim_factory(FAST)
    transport = Http1Transport(Origin.parse(sim.url), connect_timeout=5.0, head_timeout=60.0)
    try:
        stream = await transport.open(request("plain http/1.1"))
        assert await text_of(stream) == expected("plain http/1.1")
        assert transport.connection_count() == 0
        slow = await transport.open(request("cancel me", itl_ms=20, tokens=300))
        assert await slow.read()
        assert transport.connection_count() == 1
        aborted_at = time.monotonic()
        slow.reset()
        (record,) = await sim.log.wait_for(1, outcome="disconnect")
        print(f"HTTP/1.1 reset -> simulator saw the disconnect: {(record.end - aborted_at) * 1000:.2f} ms")
        # Milliseconds when the machine is idle; the bound is generous so a
        # loaded machine cannot fail it, and still far below the 6 s the
        # remaining 300 tokens would take.
        assert 0 <= record.end - aborted_at < 2.0
        assert record.tokens_sent < 300
        assert transport.connection_count() == 0
    finally:
        await transport.aclose()


async def test_http1_asks_for_the_body_uncompressed_and_relays_it_whole():
    """The HTTP/1.1 path relays the body as it arrives (no decompression), so
    it must not offer an encoding: this peer gzips whenever the request's
    Accept-Encoding admits gzip, as nginx with ``gzip_types
    text/event-stream`` does."""
    seen: list[str | None] = []
    chunks = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("un", "zipped")]

    async def chat(request: web.Request) -> web.StreamResponse:
        offered = request.headers.get("Accept-Encoding")
        seen.append(offered)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if offered is not None and "gzip" in offered:
            response.enable_compression(web.ContentCoding.gzip)
        await response.prepare(request)
        for chunk in chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as url:
        transport = Http1Transport(Origin.parse(url), connect_timeout=5.0, head_timeout=10.0)
        try:
            upstream_request = get_provider("openai").build_request(
                {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                base_path="/v1", api_key=None,
            )
            stream = await transport.open(upstream_request)
            assert dict((await stream.head()).headers).get("content-encoding") is None
            assert await text_of(stream) == "unzipped"
        finally:
            await transport.aclose()
    assert seen == ["identity"]
