"""The shipped nginx site (deploy/nginx/gateway.conf) in front of gateway + simulator.

A real nginx, the shipped file rendered only for local ports and paths, loaded
under an http {} block whose values would break streaming (nginx_fixture):
every property below holds because the site config overrides them. Clients
speak TLS, as they would in production (plain HTTP only redirects).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.config import Settings
from gateway.sim.content import answer_tokens
from tests.integration.conftest import FAST_SIM, HELD_SIM, Gateway, subscribed, upstream_held
from tests.integration.h2_test_client import H2TestClient
from tests.integration.nginx_fixture import NGINX, SHIPPED_SITE, NginxSite, free_port, running_nginx
from tests.integration.sse_frames import FrameReader, native_text, openai_text, parse_frame

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")

NGINX_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id
GATEWAY_REQUEST_ID = re.compile(r"^[0-9a-f]{24}$")  # the gateway's own (middleware)
MAX_BODY_BYTES = 1_048_576  # the gateway's default; the site's client_max_body_size
DEPLOY_GUIDE = SHIPPED_SITE.parents[1] / "README.md"

NginxFactory = Callable[..., Awaitable[NginxSite]]


def chat(prompt: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": stream}


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
async def nginx_factory(tmp_path: Path) -> AsyncIterator[NginxFactory]:
    """``await nginx_factory(gateway_port, metrics_allow=None)``: nginx with the
    shipped site in front of that port, stopped at the end of the test."""
    ca = trustme.CA()
    started = 0
    async with AsyncExitStack() as stack:

        async def start(gateway_port: int, **options: Any) -> NginxSite:
            nonlocal started
            started += 1
            workdir = tmp_path / f"nginx-{started}"
            return await stack.enter_async_context(
                running_nginx(gateway_port, workdir, ca, **options)
            )

        yield start


@dataclass
class Proxied:
    gateway: Gateway
    nginx: NginxSite

    def session(self, **options: Any) -> aiohttp.ClientSession:
        """A client of nginx's TLS side (HTTP/1.1)."""
        connector = aiohttp.TCPConnector(ssl=self.nginx.client_ssl())
        return aiohttp.ClientSession(self.nginx.https_url, connector=connector, **options)


#: What the deploy env file sets: nginx on this host is the trusted proxy.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture
async def proxied(gateway_factory, nginx_factory) -> Proxied:
    gateway = await gateway_factory(trusted_proxies=LOOPBACK)
    return Proxied(gateway, await nginx_factory(port_of(gateway.url)))


# -- streaming through nginx ------------------------------------------------------------


async def test_first_byte_through_nginx_long_before_a_slow_first_token(proxied):
    prompt = "slow start [sim ttft_ms=1500]"
    async with proxied.session() as http:
        async with http.get("/healthz") as warm:  # TLS handshake out of the measurement
            assert warm.status == 200
        sent_at = time.monotonic()
        async with http.post("/v1/chat/completions", json=chat(prompt)) as resp:
            first = await resp.content.readany()
            first_byte_ms = (time.monotonic() - sent_at) * 1000
            rest = await resp.read()
            total_s = time.monotonic() - sent_at
        assert resp.status == 200
        # gzip is on for text/event-stream at http level; the site turns it off.
        assert "Content-Encoding" not in resp.headers
    print(f"first byte through nginx after {first_byte_ms:.1f} ms (first token at 1500 ms)")
    assert first.startswith(b": ping\n\n")
    # The property is "before the first token": the ping carried no token
    # (asserted above); the clock only gets a generous ceiling.
    assert first_byte_ms < 1000
    # Silence of 1.5 s between ping and first token survived the http-level
    # proxy_read_timeout of 1 s: the site's own timeout applies.
    assert total_s >= 1.5
    frames = [parse_frame(raw + b"\n\n", 0.0) for raw in (first + rest).split(b"\n\n") if raw]
    assert openai_text(frames) == expected(prompt)
    assert frames[-1].raw == b"data: [DONE]\n\n"


async def test_tokens_arrive_one_by_one_through_nginx(proxied):
    prompt = "one by one [sim itl_ms=30 tokens=20]"
    async with proxied.session() as http, http.post("/v1/stream", json=chat(prompt)) as resp:
        frames = await FrameReader(resp).rest()
    deltas = [frame for frame in frames if frame.event == "delta"]
    assert native_text(frames) == expected(prompt, 20) and len(deltas) == 20
    gaps = [later.at - earlier.at for earlier, later in zip(deltas, deltas[1:], strict=False)]
    spread_s = deltas[-1].at - deltas[0].at
    print(f"20 tokens through nginx over {spread_s * 1000:.0f} ms (570 ms upstream); "
          f"gaps (ms): {[round(gap * 1000) for gap in gaps]}")
    # Buffered, they would come as one lump (spread ~0). One by one, the gaps
    # follow the upstream's 30 ms, give or take a noisy machine.
    assert spread_s >= 0.3
    assert sum(gap >= 0.010 for gap in gaps) >= 10


@pytest.mark.parametrize("when", ["mid-stream", "before the first token"])
async def test_client_abort_through_nginx_resets_the_upstream_stream(proxied, when):
    prompt = ("abort mid [sim itl_ms=50 tokens=200]" if when == "mid-stream"
              else "abort early [sim ttft_ms=5000]")
    sim = proxied.gateway.sim
    async with proxied.session() as http:
        resp = await http.post("/v1/stream", json=chat(prompt))
        reader = FrameReader(resp)
        assert (await reader.next()).comment == "ping"
        if when == "mid-stream":
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
        else:
            await sim.log.wait_for_arrivals(1)
        # The client drops its connection, as a closed tab does. (Not
        # resp.close(): asyncio's TLS close sends close_notify and waits for
        # nginx's, and nginx, reading nothing from a client whose request it
        # has, would notice only at its next write: up to a token later.)
        assert resp.connection is not None and resp.connection.transport is not None
        aborted_at = time.monotonic()
        resp.connection.transport.abort()
        resp.close()
        (record,) = await sim.log.wait_for(1, outcome="reset")
    latency_ms = (record.end - aborted_at) * 1000
    print(f"client abort at nginx ({when}) -> upstream RST_STREAM: {latency_ms:.2f} ms")
    assert 0 <= latency_ms < 300
    state = proxied.gateway.state
    async with asyncio.timeout(5):
        await state.registry.wait_idle()
    assert state.registry.statistics().subscribers == 0 and state.active_streams == 0


async def test_fifty_identical_streams_through_nginx_make_one_upstream_call(gateway_factory, nginx_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    proxied = Proxied(gateway, await nginx_factory(port_of(gateway.url)))
    prompt = "the burst through nginx"
    async with proxied.session() as http:

        async def one() -> tuple[str, str]:
            async with http.post("/v1/chat/completions", json=chat(prompt)) as resp:
                frames = await FrameReader(resp).rest()
            meta = next(json.loads(f.comment[5:]) for f in frames
                        if f.comment and f.comment.startswith("meta "))
            return openai_text(frames), meta["role"]

        # The upstream answers once all 50 are in, however slowly they came.
        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(one()) for _ in range(50)]
                await subscribed(gateway, 50)
        results = [task.result() for task in tasks]
    assert [text for text, _ in results] == [expected(prompt)] * 50
    roles = [role for _, role in results]
    assert roles.count("leader") == 1 and roles.count("follower") == 49
    assert len(proxied.gateway.sim.log.records) == 1
    stats = proxied.gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (1, 49)


def established_server_side(port: int) -> int:
    """TCP connections accepted on 127.0.0.1:``port`` and still open (Linux)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":  # TCP_ESTABLISHED
            count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_nginx_closes_an_idle_gateway_connection_before_the_gateway_does():
    """A request nginx sends on a kept-alive connection the gateway is
    closing at that moment fails, so nginx's idle limit stays below the
    gateway's CLIENT_IDLE_TIMEOUT_S, and the deploy guide says to keep them so."""
    upstream = re.search(r"^upstream llm_gateway \{(.*?)^\}", SHIPPED_SITE.read_text(), re.S | re.M)
    assert upstream is not None
    keepalive = re.search(r"^\s*keepalive_timeout (\d+)s;", upstream[1], re.M)
    assert keepalive is not None
    assert float(keepalive[1]) < Settings.from_env({}).client_idle_timeout_s
    in_step = r"^\| `CLIENT_IDLE_TIMEOUT_S`.*\|.*`keepalive_timeout`"
    assert re.search(in_step, DEPLOY_GUIDE.read_text(), re.M) is not None


async def test_nginx_keeps_one_connection_to_the_gateway_alive(proxied):
    async with proxied.session() as http:
        for n in range(5):
            async with http.post("/v1/chat/completions", json=chat(f"one of five {n}")) as resp:
                assert resp.status == 200
                await resp.read()
    # HTTP/1.1 with an empty Connection header: five requests, one upstream
    # connection, still open for the next (nginx's default would be HTTP/1.0
    # and a connection per request, none left open).
    assert established_server_side(port_of(proxied.gateway.url)) == 1


async def test_http2_and_tls_towards_clients(proxied):
    sim = proxied.gateway.sim
    client = await H2TestClient.connect(
        "127.0.0.1", proxied.nginx.https_port, ssl=proxied.nginx.client_ssl(alpn=("h2",))
    )
    try:
        assert client.transport is not None
        assert client.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        prompt = "over h2 [sim itl_ms=2 tokens=12]"
        exchange = client.start_json("/v1/stream", chat(prompt))
        async with asyncio.timeout(5):
            await exchange.done.wait()
        assert exchange.status == 200 and exchange.ended
        assert exchange.headers["content-type"].startswith("text/event-stream")
        frames = [parse_frame(raw + b"\n\n", 0.0) for raw in exchange.body.split(b"\n\n") if raw]
        assert native_text(frames) == expected(prompt, 12)
        assert frames[-1].event == "done"

        # An h2 client cancels with RST_STREAM; nginx closes its gateway
        # connection, and the upstream stream is reset in turn.
        slow = client.start_json("/v1/stream", chat("h2 abort [sim itl_ms=50 tokens=200]"))
        async with asyncio.timeout(5):
            while b"event: delta" not in slow.body:
                slow.data_arrived.clear()
                await slow.data_arrived.wait()
        aborted_at = time.monotonic()
        client.reset(slow.stream_id)
        (record,) = await sim.log.wait_for(1, outcome="reset")
        print(f"h2 RST_STREAM at nginx -> upstream RST_STREAM: {(record.end - aborted_at) * 1000:.2f} ms")
        assert record.end - aborted_at < 0.3
    finally:
        await client.close()


async def test_plain_http_is_sent_to_tls_with_its_method(proxied):
    async with aiohttp.ClientSession() as http, http.post(
        proxied.nginx.http_url + "/v1/chat/completions", json=chat("hi"), allow_redirects=False
    ) as resp:
        assert resp.status == 308  # a POST stays a POST
        assert resp.headers["Location"] == "https://127.0.0.1/v1/chat/completions"
    assert proxied.gateway.sim.log.records == []


# -- operations: /metrics, ids, addresses --------------------------------------------------


async def test_metrics_only_for_the_allow_list(gateway, nginx_factory):
    allowed = await nginx_factory(port_of(gateway.url))
    excluded = await nginx_factory(port_of(gateway.url), metrics_allow=["192.0.2.1"])
    assert "allow 127.0.0.1;" in allowed.rendered and "deny all;" in allowed.rendered
    for site, status in ((allowed, 200), (excluded, 403)):
        connector = aiohttp.TCPConnector(ssl=site.client_ssl())
        async with aiohttp.ClientSession(site.https_url, connector=connector) as http:
            async with http.get("/metrics") as metrics:
                assert metrics.status == status
                body = await metrics.text()
            async with http.get("/stats") as stats:
                assert stats.status == status
            async with http.get("/healthz") as health:
                assert health.status == 200  # only /metrics and /stats are restricted
        if status == 200:
            assert "# TYPE gateway_requests_total counter" in body


async def test_a_host_off_the_allow_list_gets_the_gateways_403(gateway, nginx_factory):
    site = await nginx_factory(port_of(gateway.url), metrics_allow=["192.0.2.1"])
    connector = aiohttp.TCPConnector(ssl=site.client_ssl())
    async with aiohttp.ClientSession(site.https_url, connector=connector) as http:
        for path in ("/metrics", "/stats"):
            async with http.get(path) as denied:
                assert denied.status == 403
                assert denied.content_type == "application/json"
                assert NGINX_REQUEST_ID.match(denied.headers["X-Request-Id"])
                assert await denied.json() == {"error": {
                    "message": "/metrics and /stats are only served to the hosts on the allow-list",
                    "type": "permission_error", "code": "permission_denied"}}


async def test_nginx_gives_the_request_id_and_the_client_address(proxied):
    with capture_logs(processors=[merge_contextvars]) as logs:
        async with proxied.session() as http, http.post(
            "/v1/chat/completions",
            json=chat("whose id", stream=False),
            headers={"X-Request-Id": "chosen-by-the-client", "X-Forwarded-For": "203.0.113.7"},
        ) as resp:
            assert resp.status == 200
            await resp.read()
    request_id = resp.headers["X-Request-Id"]
    # nginx's id replaced the client's, and the gateway (trusting nginx on
    # loopback) took it as its own.
    assert NGINX_REQUEST_ID.match(request_id)
    (line,) = [line for line in logs if line["event"] == "request"]
    assert line["request_id"] == request_id
    # The right-most X-Forwarded-For entry is nginx's; the client's forgery sits left of it.
    assert line["client"] == "127.0.0.1"


async def test_ids_and_addresses_are_taken_only_from_trusted_proxies(gateway_factory, nginx_factory):
    trusting = await gateway_factory(trusted_proxies=LOOPBACK)  # as the deploy env file
    distrusting = await gateway_factory()  # TRUSTED_PROXIES default: none
    headers = {"X-Request-Id": "from-the-peer-1", "X-Forwarded-For": "203.0.113.7"}
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(trusting.v1 + "/chat/completions", headers=headers,
                                 json=chat("trusted", stream=False)) as kept:
                assert kept.headers["X-Request-Id"] == "from-the-peer-1"
            async with http.post(distrusting.v1 + "/chat/completions", headers=headers,
                                 json=chat("distrusted", stream=False)) as replaced:
                assert GATEWAY_REQUEST_ID.match(replaced.headers["X-Request-Id"])
    clients = {line["request_id"]: line["client"] for line in logs if line["event"] == "request"}
    assert clients == {"from-the-peer-1": "203.0.113.7",
                       replaced.headers["X-Request-Id"]: "127.0.0.1"}

    # Behind nginx, a gateway that does not trust it ignores nginx's id too.
    site = await nginx_factory(port_of(distrusting.url))
    connector = aiohttp.TCPConnector(ssl=site.client_ssl())
    async with aiohttp.ClientSession(site.https_url, connector=connector) as http, \
            http.get("/healthz") as resp:
        assert GATEWAY_REQUEST_ID.match(resp.headers["X-Request-Id"])


# -- errors nginx answers itself ---------------------------------------------------------


def body_of_exactly(size: int) -> io.BytesIO:
    """A valid chat request of exactly ``size`` bytes (as a file: aiohttp
    warns about big bytes bodies)."""
    shell = json.dumps(chat("[sim tokens=1] ", stream=False)).encode()
    padding = size - len(shell)
    body = json.dumps(chat("[sim tokens=1] " + "x" * padding, stream=False)).encode()
    assert len(body) == size
    return io.BytesIO(body)


async def test_body_limit_matches_the_gateway_and_speaks_its_error_shape(proxied):
    headers = {"Content-Type": "application/json"}
    async with proxied.session() as http:
        async with http.post("/v1/chat/completions", data=body_of_exactly(MAX_BODY_BYTES),
                             headers=headers) as at_limit:
            assert at_limit.status == 200  # reached the gateway and was answered
            assert (await at_limit.json())["object"] == "chat.completion"
        async with http.post("/v1/chat/completions", data=body_of_exactly(MAX_BODY_BYTES + 1),
                             headers=headers) as over:
            assert over.status == 413
            assert NGINX_REQUEST_ID.match(over.headers["X-Request-Id"])
            error = (await over.json())["error"]
    assert error == {"message": "request body is over the 1048576-byte limit",
                     "type": "invalid_request_error", "code": "payload_too_large"}
    assert len(proxied.gateway.sim.log.records) == 1


async def test_nginx_answers_the_messages_api_in_its_own_error_shape(proxied, nginx_factory):
    headers = {"Content-Type": "application/json"}
    async with proxied.session() as http, http.post(
        "/v1/messages", data=body_of_exactly(MAX_BODY_BYTES + 1), headers=headers
    ) as over:
        assert over.status == 413
        assert await over.json() == {"type": "error", "error": {
            "type": "request_too_large", "message": "request body is over the 1048576-byte limit"}}
    site = await nginx_factory(free_port())  # no gateway: nginx's own 503
    connector = aiohttp.TCPConnector(ssl=site.client_ssl())
    async with aiohttp.ClientSession(site.https_url, connector=connector) as http, \
            http.post("/v1/messages", json=chat("anyone?")) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["type"] == "overloaded_error"


async def _raw_exchange(site: NginxSite, head: bytes) -> tuple[bytes, bytes]:
    """``head`` sent as is over TLS; nginx's answer as (status line and
    headers, body), read until nginx closes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", site.https_port, ssl=site.client_ssl()
    )
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    top, _, body = answer.partition(b"\r\n\r\n")
    return top, body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_header_over_nginxs_buffers_is_the_gateways_400(proxied, path):
    top, body = await _raw_exchange(proxied.nginx, (
        f"POST {path} HTTP/1.1\r\nHost: gateway.example.com\r\n"
        f"X-Big: {'a' * 9000}\r\nContent-Length: 0\r\n\r\n"
    ).encode())
    assert top.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nContent-Type: application/json\r\n" in top
    assert NGINX_REQUEST_ID.match(re.search(rb"\r\nX-Request-Id: (\S+)", top)[1].decode())
    message = "a request line or header is too long"
    if path == "/v1/messages":
        assert json.loads(body) == {"type": "error", "error": {
            "type": "invalid_request_error", "message": message}}
    else:
        assert json.loads(body) == {"error": {
            "message": message, "type": "invalid_request_error", "code": "invalid_http"}}
    assert proxied.gateway.sim.log.records == []


async def test_a_request_line_over_nginxs_buffers_is_the_gateways_400(proxied):
    top, body = await _raw_exchange(proxied.nginx, (
        f"GET /v1/models?q={'a' * 9000} HTTP/1.1\r\nHost: gateway.example.com\r\n\r\n"
    ).encode())
    assert top.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"error": {"message": "a request line or header is too long",
                                          "type": "invalid_request_error", "code": "invalid_http"}}


@pytest.mark.parametrize("path", ["/.nginx/invalid-http", "/.nginx/line-too-long"])
async def test_the_error_pages_of_nginx_are_not_served_as_paths(proxied, path):
    async with proxied.session() as http, http.get(path) as resp:
        assert resp.status == 404
        assert NGINX_REQUEST_ID.match(resp.headers["X-Request-Id"])
        assert await resp.json() == {"error": {
            "message": "no such path", "type": "invalid_request_error", "code": "not_found"}}


@pytest.mark.parametrize("head", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.example.com\r\nContent-Length: x\r\n\r\n",
    b"POST\x01 / HTTP/1.1\r\nHost: gateway.example.com\r\n\r\n",
], ids=["header", "request line"])
async def test_a_request_nginx_cannot_parse_is_the_gateways_400(proxied, head):
    top, body = await _raw_exchange(proxied.nginx, head)
    assert top.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"error": {"message": "the request is not valid HTTP/1.1",
                                          "type": "invalid_request_error", "code": "invalid_http"}}


async def test_no_gateway_listening_is_a_retryable_503(nginx_factory):
    site = await nginx_factory(free_port())  # nothing listens there: a restart
    connector = aiohttp.TCPConnector(ssl=site.client_ssl())
    async with aiohttp.ClientSession(site.https_url, connector=connector) as http, \
            http.post("/v1/chat/completions", json=chat("anyone?")) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert NGINX_REQUEST_ID.match(resp.headers["X-Request-Id"])
        assert (await resp.json())["error"]["code"] == "gateway_unavailable"


async def _half_closing_client_waits_for_its_first_token(
    proxied: Proxied, prompt: str
) -> tuple[asyncio.StreamWriter, float]:
    """A TLS client (asyncio's own) that has its ``: ping`` and waits for a
    first token 5 s away, then closes as asyncio's TLS transport does: it
    sends close_notify and keeps the TCP connection open until the peer's
    close_notify comes back. Returns the writer and when it closed."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proxied.nginx.https_port, ssl=proxied.nginx.client_ssl()
    )
    body = json.dumps(chat(prompt)).encode()
    writer.write(
        b"POST /v1/stream HTTP/1.1\r\nHost: gateway.example.com\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await reader.readuntil(b": ping\n\n")
    await proxied.gateway.sim.log.wait_for_arrivals(1)
    closed_at = time.monotonic()
    writer.close()  # close_notify; the socket stays open
    return writer, closed_at


async def test_a_half_closing_tls_client_before_the_first_token_resets_the_upstream(proxied):
    """nginx learns that a client which sent close_notify but kept its TCP
    connection has gone only when a write to it fails. The pings sent while
    the first token is awaited (FIRST_TOKEN_PING_INTERVAL_MS, 150 ms) are
    those writes: the upstream stream is reset well within 300 ms."""
    sim = proxied.gateway.sim
    writer, closed_at = await _half_closing_client_waits_for_its_first_token(
        proxied, "half-close [sim ttft_ms=5000]"
    )
    (record,) = await sim.log.wait_for(1, outcome="reset", timeout=3.0)
    latency_ms = (record.end - closed_at) * 1000
    print(f"TLS close_notify at nginx (before the first token) -> upstream RST_STREAM: "
          f"{latency_ms:.1f} ms")
    assert 0 <= latency_ms < 300
    state = proxied.gateway.state
    async with asyncio.timeout(5):
        await state.registry.wait_idle()
    assert state.registry.statistics().subscribers == 0 and state.active_streams == 0
    assert state.keepalive.waiting == 0 and len(state.keepalive) == 0
    writer.transport.abort()


async def test_without_first_token_pings_a_half_closed_client_looks_alive(
    gateway_factory, nginx_factory
):
    """The control, which shows the client above really half-closes: with
    the first-token pings off, nothing is written to it for PING_INTERVAL_S
    and nginx, and so the upstream, goes on for a whole second."""
    gateway = await gateway_factory(first_token_ping_interval_ms=0)
    proxied = Proxied(gateway, await nginx_factory(port_of(gateway.url)))
    writer, _ = await _half_closing_client_waits_for_its_first_token(
        proxied, "half-close, no pings [sim ttft_ms=5000]"
    )
    with pytest.raises(TimeoutError):
        await gateway.sim.log.wait_for(1, timeout=1.0)
    assert gateway.state.active_streams == 1
    writer.transport.abort()  # a TCP FIN/RST nginx does notice
    (record,) = await gateway.sim.log.wait_for(1, outcome="reset")
    assert record.outcome == "reset"
