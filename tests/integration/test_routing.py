"""Several upstreams over real sockets: routing by model, fallback and retry
before the first token, the circuit breaker, /readyz and /v1/models.

Each upstream is its own simulator instance with its own failure injection
(its process profile); the gateway reads a routing file built from their
URLs, through the same parser as GATEWAY_CONFIG.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import trustme
from structlog.testing import capture_logs

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.routing.config import parse_routing
from gateway.sim import SimProfile, SimServer
from gateway.sim.app import MODELS as SIM_MODELS
from gateway.sim.content import answer_tokens
from gateway.state import STATE, GatewayState
from tests.integration.conftest import FAST_SIM, until
from tests.integration.faulty_upstream import faulty_upstream
from tests.integration.metrics_scrape import Scrape, scrape
from tests.integration.sse_frames import FrameReader, native_text, openai_text

#: The circuit opens after this many consecutive failures (the file says so).
CIRCUIT_FAILURES = 3


@dataclasses.dataclass
class Routed:
    url: str
    state: GatewayState

    @property
    def v1(self) -> str:
        return self.url + "/v1"


RoutedFactory = Callable[..., Awaitable[Routed]]


@pytest.fixture
async def routed() -> AsyncIterator[RoutedFactory]:
    """``await routed(toml, **settings)``: a gateway on a free port whose
    upstreams are the file's."""
    contexts = []

    async def start(toml: str, **overrides: Any) -> Routed:
        settings = Settings(host="127.0.0.1", port=0,
                            routing=parse_routing(toml, {"SIM_KEY": "sk-sim"}), **overrides)
        context = running_gateway(settings)
        app, url = await context.__aenter__()
        contexts.append(context)
        return Routed(url, app[STATE])

    yield start
    for context in reversed(contexts):
        await context.__aexit__(None, None, None)


def upstream(name: str, url: str, *, priority: int = 0, models: str = '["*"]',
             extra: str = "") -> str:
    return (f'[[upstream]]\nname = "{name}"\nurl = "{url}"\nprotocol = "h2c"\n'
            f"models = {models}\npriority = {priority}\n{extra}\n")


ROUTING = f"[routing]\ncircuit_failures = {CIRCUIT_FAILURES}\ncircuit_cooldown_ms = 60000\n"


def refused_url() -> str:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def chat(prompt: str, *, model: str = "sim", stream: bool = True) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


async def stream_text(http: aiohttp.ClientSession, gateway: Routed, prompt: str,
                      **kw: Any) -> tuple[str, dict[str, Any], list[Any]]:
    """The answer's text, the meta record, and every frame (pings included)."""
    async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt, **kw)) as resp:
        assert resp.status == 200
        frames = await FrameReader(resp).rest()
    metas = [json.loads(f.comment[5:]) for f in frames if f.comment and f.comment.startswith("meta ")]
    return openai_text(frames), (metas[0] if metas else {}), frames


def only_pings_then_the_answer(frames: list[Any]) -> bool:
    """Before the meta record, nothing but pings; at the end, [DONE]."""
    first_meta = next(i for i, f in enumerate(frames) if f.comment and f.comment.startswith("meta "))
    return (all(f.raw == b": ping\n\n" for f in frames[:first_meta])
            and frames[-1].raw == b"data: [DONE]\n\n"
            and not any(f.data and '"error"' in f.data for f in frames))


async def twenty_whole_answers(http: aiohttp.ClientSession, gateway: Routed, label: str) -> list[float]:
    """Twenty streamed requests one after another, each answered whole with
    nothing but pings before its meta record; their TTFTs (ms)."""
    ttfts = []
    for n in range(20):
        text, meta, frames = await stream_text(http, gateway, f"{label} {n}")
        assert text == expected(f"{label} {n}")
        assert only_pings_then_the_answer(frames)
        ttfts.append(meta["ttft_ms"])
    return ttfts


async def metrics(http: aiohttp.ClientSession, gateway: Routed) -> Scrape:
    return await scrape(http, gateway.url)


# -- fallback ------------------------------------------------------------------------


async def test_fallback_on_a_refused_port(routed, sim_factory):
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", refused_url())
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        ttfts = await twenty_whole_answers(http, gateway, "refused")
        scraped = await metrics(http, gateway)
    # A refused connection costs little: the backup's own TTFT (5 ms) and tens
    # of ms at most, even for the requests that tried the dead one first.
    assert max(ttfts) < 5 + 95, ttfts
    assert [r.outcome for r in backup.log.records] == ["complete"] * 20
    # The dead one cost the first requests only: then its circuit is open.
    assert scraped.value("gateway_upstream_failures_total", upstream="primary") == CIRCUIT_FAILURES
    assert scraped.one("gateway_upstream_retries_total", upstream="primary",
                       reason="connect") == CIRCUIT_FAILURES
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 1
    assert scraped.one("gateway_upstream_circuit_open", upstream="backup") == 0
    assert scraped.one("gateway_upstream_requests_total", upstream="backup", status="200") == 20
    assert scraped.one("gateway_upstream_in_flight", upstream="backup") == 0


async def test_fallback_on_503_to_everything(routed, sim_factory):
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=503))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            ttfts = await twenty_whole_answers(http, gateway, "503")
            assert max(ttfts) < 5 + 95, ttfts  # the backup's own TTFT and tens of ms
            # Non-streaming too: the client gets a 200 with the answer.
            async with http.post(gateway.v1 + "/chat/completions",
                                 json=chat("503 whole", stream=False)) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["choices"][0]["message"]["content"] == expected("503 whole")
            scraped = await metrics(http, gateway)
    assert [r.status for r in primary.log.records] == [503] * CIRCUIT_FAILURES
    assert [r.outcome for r in backup.log.records] == ["complete"] * 21
    assert scraped.one("gateway_upstream_retries_total", upstream="primary",
                       reason="5xx") == CIRCUIT_FAILURES
    assert scraped.one("gateway_upstream_requests_total", upstream="primary",
                       status="503") == CIRCUIT_FAILURES
    retries = [line for line in logs if line["event"] == "upstream retry"]
    assert retries[0] == {"event": "upstream retry", "log_level": "info", "upstream": "primary",
                          "reason": "5xx", "status": 503, "next": "backup", "delay_ms": 0,
                          "attempt": 2}
    assert len(retries) == CIRCUIT_FAILURES


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_refusing_our_key_falls_back_and_opens_its_circuit(
        routed, sim_factory, status):
    """A revoked upstream key is that upstream's failure, not the client's:
    the request goes to the backup, and the circuit stops asking."""
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=status))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        await twenty_whole_answers(http, gateway, f"revoked {status}")
        scraped = await metrics(http, gateway)
    assert [r.status for r in primary.log.records] == [status] * CIRCUIT_FAILURES
    assert len(backup.log.records) == 20
    assert scraped.one("gateway_upstream_retries_total", upstream="primary",
                       reason="auth") == CIRCUIT_FAILURES
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 1


async def test_fallback_on_429_keeps_away_for_its_retry_after(routed, sim_factory):
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=429, retry_after_s=30))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        await twenty_whole_answers(http, gateway, "429")
        scraped = await metrics(http, gateway)
    # One 429 with Retry-After: 30 is enough: nobody asks again within 30 s.
    assert [r.status for r in primary.log.records] == [429]
    assert len(backup.log.records) == 20
    assert scraped.one("gateway_upstream_retries_total", upstream="primary", reason="429") == 1
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 1


async def test_fallback_on_a_first_token_timeout(routed, sim_factory):
    primary = await sim_factory(dataclasses.replace(FAST_SIM, ttft_ms=5000))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(
        upstream("primary", primary.url, extra="first_token_timeout_ms = 150")
        + upstream("backup", backup.url, priority=1) + ROUTING
    )
    async with aiohttp.ClientSession() as http:
        ttfts = await twenty_whole_answers(http, gateway, "slow")
        scraped = await metrics(http, gateway)
    await primary.log.wait_for(CIRCUIT_FAILURES)
    assert [r.outcome for r in primary.log.records] == ["reset"] * CIRCUIT_FAILURES
    assert len(backup.log.records) == 20
    assert scraped.one("gateway_upstream_retries_total", upstream="primary",
                       reason="timeout") == CIRCUIT_FAILURES
    # The first ones waited out the primary's 150 ms; once its circuit is
    # open, the backup's own TTFT (5 ms) and a few ms of ours, no more.
    assert all(ms >= 150 for ms in ttfts[:CIRCUIT_FAILURES])
    print(f"TTFT through the backup once the circuit is open: max {max(ttfts[CIRCUIT_FAILURES:])} ms")
    assert max(ttfts[CIRCUIT_FAILURES:]) < 5 + 95


async def test_a_fallback_that_gets_no_response_head_ends_at_the_first_token_deadline(
        routed, sim_factory):
    """The primary fails late (its own 800 ms first-token timeout); the
    backup, over HTTP/1.1, never sends a response head. The request ends at
    its first-token deadline (1 s), not after a whole wait for the backup's
    head on top of the primary's 800 ms."""
    primary = await sim_factory(dataclasses.replace(FAST_SIM, ttft_ms=5000))
    async with faulty_upstream() as backup:
        gateway = await routed(
            upstream("primary", primary.url, extra="first_token_timeout_ms = 800")
            + f'[[upstream]]\nname = "backup"\nurl = "{backup.url}"\nprotocol = "http1"\n'
            + "priority = 1\n" + ROUTING,
            upstream_first_token_timeout_ms=1000,
        )
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as http:
            started = loop.time()
            async with http.post(gateway.v1 + "/chat/completions",
                                 json=chat("silent backup", stream=False)) as resp:
                status, body = resp.status, await resp.json()
            took = loop.time() - started
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert backup.requests == 1
    # The deadline is 1.0 s; the backup's own head timeout would end it at 1.8 s.
    assert took < 1.5, took


async def test_a_success_ends_an_upstreams_retry_after_hold(routed):
    """A 429 with Retry-After: 7 holds the only upstream off; the next
    request goes there anyway and is answered, so the hold is over. A later
    429 without Retry-After is then retried at once, not refused a retry as
    if the old 7 s (past max_retry_after_ms) were still to be waited for."""
    async with faulty_upstream() as only:
        gateway = await routed(
            f'[[upstream]]\nname = "only"\nurl = "{only.url}"\nprotocol = "http1"\n'
            + "[routing]\nmax_attempts = 2\nmax_retry_after_ms = 1000\n",
        )
        async with aiohttp.ClientSession() as http:
            statuses = []
            for prompt in ("rate-limited", "hello", "throttled"):
                async with http.post(gateway.v1 + "/chat/completions",
                                     json=chat(prompt, stream=False)) as resp:
                    statuses.append(resp.status)
                    await resp.read()
                    if prompt == "throttled":
                        # Its two attempts, and only them.
                        assert only.requests == 4
            scraped = await metrics(http, gateway)
    assert statuses == [429, 200, 429]
    assert scraped.one("gateway_upstream_retries_total", upstream="only", reason="429") == 1


async def test_no_fallback_starts_with_too_little_of_the_deadline_left(routed, sim_factory):
    """The primary times out (its own 950 ms) with 50 ms of the request's
    1 s first-token deadline left: too little for any model to answer, so no
    attempt goes to the backup (a prompt sent for nothing) and the client
    gets the primary's timeout."""
    slow = dataclasses.replace(FAST_SIM, ttft_ms=5000)
    primary = await sim_factory(slow)
    backup = await sim_factory(slow)
    gateway = await routed(
        upstream("primary", primary.url, extra="first_token_timeout_ms = 950")
        + upstream("backup", backup.url, priority=1) + ROUTING,
        upstream_first_token_timeout_ms=1000,
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions",
                             json=chat("late", stream=False)) as resp:
            status, body = resp.status, await resp.json()
        scraped = await metrics(http, gateway)
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert len(primary.log.records) == 1 and backup.log.records == []
    assert scraped.value("gateway_upstream_retries_total") == 0
    assert scraped.one("gateway_upstream_in_flight", upstream="primary") == 0


async def test_an_upstream_that_streams_only_usage_chunks_fails_before_the_deadline(routed):
    """Usage-only chunks without end and no content: what the attempt holds
    back before its first token is bounded, and past the bound the attempt
    fails as the malformed stream it is (502, not retried), long before its
    first-token deadline (30 s) would end it as a 504."""
    async with faulty_upstream() as only:
        gateway = await routed(
            f'[[upstream]]\nname = "only"\nurl = "{only.url}"\nprotocol = "http1"\n' + ROUTING,
            upstream_first_token_timeout_ms=30_000,
        )
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(15):  # a ceiling only
                async with http.post(gateway.v1 + "/chat/completions",
                                     json=chat("usage-flood", stream=False)) as resp:
                    status, body = resp.status, await resp.json()
            scraped = await metrics(http, gateway)
    assert status == 502 and body["error"]["code"] == "upstream_protocol_error"
    assert only.requests == 1
    assert scraped.one("gateway_upstream_failures_total", upstream="only", kind="protocol") == 1
    assert scraped.one("gateway_upstream_in_flight", upstream="only") == 0


async def test_fallback_on_a_tls_failure(routed, sim_factory):
    """The primary's certificate is from a CA the gateway does not trust."""
    untrusted = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    untrusted.issue_cert("127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    primary = await sim_factory(FAST_SIM, ssl=context)
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(
        f'[[upstream]]\nname = "primary"\nurl = "{primary.url}"\n'
        + upstream("backup", backup.url, priority=1) + ROUTING
    )
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            text, _, frames = await stream_text(http, gateway, f"tls {n}")
            assert text == expected(f"tls {n}") and only_pings_then_the_answer(frames)
        scraped = await metrics(http, gateway)
    assert primary.log.records == []  # no request got past the handshake
    assert len(backup.log.records) == 5
    assert scraped.one("gateway_upstream_failures_total", upstream="primary",
                       kind="connect") == CIRCUIT_FAILURES


async def test_fallback_on_refused_streams_after_goaway(routed, sim_factory):
    """Every stream lands above the GOAWAY's last_stream_id (RFC 9113 §6.8):
    never processed, safe to send elsewhere."""
    primary = await sim_factory(dataclasses.replace(FAST_SIM, goaway="refuse"))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            text, _, frames = await stream_text(http, gateway, f"goaway {n}")
            assert text == expected(f"goaway {n}") and only_pings_then_the_answer(frames)
        scraped = await metrics(http, gateway)
    assert len(backup.log.records) == 5
    assert scraped.one("gateway_upstream_retries_total", upstream="primary",
                       reason="refused") == CIRCUIT_FAILURES
    # The HTTP/2 pool sends a refused stream three times in all before the
    # router hears of it.
    assert [r.outcome for r in primary.log.records] == ["failed"] * 3 * CIRCUIT_FAILURES


async def test_a_stream_cut_after_its_first_tokens_is_not_retried(routed, sim_factory):
    # Tokens 30 ms apart: each reaches the client before the reset does.
    primary = await sim_factory(dataclasses.replace(FAST_SIM, reset_after=3, itl_ms=30))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat("cut short")) as resp:
            frames = await FrameReader(resp).rest()
        scraped = await metrics(http, gateway)
    assert openai_text(frames[:-1]) == "".join(
        answer_tokens([{"role": "user", "content": "cut short"}], 3))
    assert frames[-1].json()["error"]["code"] == "upstream_stream_reset"
    assert all(f.data != "[DONE]" for f in frames)
    assert backup.log.records == []
    assert scraped.value("gateway_upstream_retries_total") == 0
    assert scraped.one("gateway_upstream_failures_total", upstream="primary",
                       kind="after_first_token") == 1


async def test_a_burst_during_a_failover_makes_one_call_on_the_backup(routed, sim_factory):
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=503, ttft_ms=100))
    backup = await sim_factory(dataclasses.replace(FAST_SIM, ttft_ms=100))
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    prompt = "the burst in a failover"
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(stream_text(http, gateway, prompt) for _ in range(50)))
    assert {text for text, _, _ in results} == {expected(prompt)}
    assert all(only_pings_then_the_answer(frames) for _, _, frames in results)
    assert len(primary.log.records) == 1
    assert [r.outcome for r in backup.log.records] == ["complete"]


# -- balancing ----------------------------------------------------------------------


async def test_equal_priorities_share_by_weight_within_admission_limits(routed, sim_factory):
    slow = dataclasses.replace(FAST_SIM, ttft_ms=300)
    sims = {name: await sim_factory(slow) for name in ("one", "two", "small")}
    gateway = await routed(
        upstream("one", sims["one"].url, extra="weight = 1")
        + upstream("two", sims["two"].url, extra="weight = 2")
        + upstream("small", sims["small"].url, extra="weight = 100\nmax_inflight = 2")
    )
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(stream_text(http, gateway, f"share {n}")
                                         for n in range(11)))
    assert [text for text, _, _ in results] == [expected(f"share {n}") for n in range(11)]
    # "small" takes what its limit allows; the other nine go 1:2 by weight.
    assert {name: len(sim.log.records) for name, sim in sims.items()} == {
        "one": 3, "two": 6, "small": 2}
    assert all(up.in_flight == 0 for up in gateway.state.router.upstreams)


async def test_a_full_upstream_queues_its_requests_in_order(routed, sim_factory):
    """Its max_inflight reached and no other candidate: the next stream waits
    for a slot (FIFO) instead of going over the limit."""
    only = await sim_factory(dataclasses.replace(FAST_SIM, ttft_ms=50))
    gateway = await routed(upstream("only", only.url, extra="max_inflight = 1"))
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(stream_text(http, gateway, f"queued {n}")
                                         for n in range(3)))
    assert [text for text, _, _ in results] == [expected(f"queued {n}") for n in range(3)]
    records = sorted(only.log.records, key=lambda r: r.arrival)
    assert all(later.arrival >= earlier.end  # type: ignore[operator]
               for earlier, later in itertools.pairwise(records))


async def test_a_wait_for_an_upstreams_slot_that_times_out_is_no_open_failure(
        routed, sim_factory):
    """The upstream's one slot held by a stream that idles after its first
    token: the next request waits for that slot until its first-token
    deadline and is shed (503 queue_timeout). Nothing was tried upstream, so
    it is a ``busy`` failure, not an upstream request that could not be sent."""
    only = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("only", only.url, extra="max_inflight = 1"),
                           upstream_first_token_timeout_ms=1000)
    async with aiohttp.ClientSession() as http:
        holder = await http.post(gateway.v1 + "/chat/completions",
                                 json=chat("hold the slot [sim itl_ms=60000]"))
        assert (await FrameReader(holder).next()).comment == "ping"
        await only.log.wait_for_arrivals(1)
        async with http.post(gateway.v1 + "/chat/completions",
                             json=chat("wait for it", stream=False)) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "queue_timeout"
        holder.close()
        await gateway.state.registry.wait_idle()
        scraped = await metrics(http, gateway)
    assert len(only.log.records) == 1
    assert scraped.one("gateway_upstream_failures_total", upstream="only", kind="busy") == 1
    assert scraped.one("gateway_upstream_open_failures_total") == 0


async def test_an_attempt_waiting_for_an_upstreams_slot_is_queued_not_in_flight(
        routed, sim_factory):
    """max_inflight = 1: one stream holds the upstream's slot, one waits in
    that upstream's admission queue. The upstream has one stream open, and
    its in-flight gauge says so; the gateway's own queue is empty, yet one
    request waits for admission: the queue depth says 1. Then all 0."""
    only = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("only", only.url, extra="max_inflight = 1"))
    (up,) = gateway.state.router.upstreams
    assert up.admission is not None
    async with aiohttp.ClientSession() as http:
        holder = await http.post(gateway.v1 + "/chat/completions",
                                 json=chat("hold the slot [sim ttft_ms=60000]"))
        await only.log.wait_for_arrivals(1)
        waiter = await http.post(gateway.v1 + "/chat/completions", json=chat("wait for it"))
        await until(lambda: up.admission is not None and up.admission.depth == 1)
        waiting = await metrics(http, gateway)
        async with http.get(gateway.url + "/stats") as resp:
            waiting_stats = await resp.json()
        waiter.close()
        holder.close()
        await gateway.state.registry.wait_idle()
        after = await metrics(http, gateway)
        async with http.get(gateway.url + "/stats") as resp:
            after_stats = await resp.json()
    assert len(only.log.records) == 1
    assert waiting.one("gateway_upstream_in_flight", upstream="only") == 1
    assert after.one("gateway_upstream_in_flight", upstream="only") == 0
    assert (waiting.one("gateway_queue_depth"), waiting_stats["queue_depth"]) == (1, 1)
    assert (after.one("gateway_queue_depth"), after_stats["queue_depth"]) == (0, 0)


async def test_in_flight_returns_to_zero_when_the_answer_ends_in_its_first_read(
        routed, sim_factory):
    """One token and the end in the same read: the attempt's stream is
    released before its first token is handed out, and still counted out."""
    only = await sim_factory(dataclasses.replace(FAST_SIM, tokens=1, itl_ms=0))
    gateway = await routed(upstream("only", only.url, extra="max_inflight = 1"))
    async with aiohttp.ClientSession() as http:
        for n in range(5):
            text, _, _ = await stream_text(http, gateway, f"short {n}")
            assert text == expected(f"short {n}", 1)
        scraped = await metrics(http, gateway)
    (up,) = gateway.state.router.upstreams
    assert up.in_flight == 0 and up.admission is not None and up.admission.inflight == 0
    assert scraped.one("gateway_upstream_in_flight", upstream="only") == 0


async def test_fallback_across_formats_on_the_native_api(routed, sim_factory):
    """An Anthropic-format upstream failing, an OpenAI-format one answering:
    each candidate gets its own request, the client one answer."""
    claude = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=529))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(
        upstream("claude", claude.url, models='["claude"]', extra='format = "anthropic"')
        + upstream("backup", backup.url, priority=1) + ROUTING
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat("across", model="claude")) as resp:
            frames = await FrameReader(resp).rest()
    assert native_text(frames) == expected("across")
    assert [f.event for f in frames if f.event][-1] == "done"
    assert [(r.path, r.status) for r in claude.log.records] == [("/v1/messages", 529)]
    assert [(r.path, r.model) for r in backup.log.records] == [("/v1/chat/completions", "claude")]


# -- routing by model --------------------------------------------------------------


async def test_routing_by_model_with_a_renamed_model(routed, sim_factory):
    alpha = await sim_factory(FAST_SIM)
    beta = await sim_factory(FAST_SIM)
    gateway = await routed(
        upstream("alpha", alpha.url, models='["alpha-1", "alpha-2"]')
        + upstream("beta", beta.url, models='["beta"]',
                   extra='model_map = { "beta" = "beta-2024-01" }')
    )
    async with aiohttp.ClientSession() as http:
        for model in ("alpha-1", "beta", "alpha-2", "beta"):
            text, _, _ = await stream_text(http, gateway, f"to {model}", model=model)
            assert text == expected(f"to {model}")
        async with http.get(gateway.v1 + "/models") as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
    assert [r.model for r in alpha.log.records] == ["alpha-1", "alpha-2"]
    assert [r.model for r in beta.log.records] == ["beta-2024-01", "beta-2024-01"]
    assert listed == ["alpha-1", "alpha-2", "beta"]


async def test_an_unknown_model_is_404_model_not_found(routed, sim_factory):
    only = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("only", only.url, models='["known"]'))
    async with aiohttp.ClientSession() as http:
        for path in ("/chat/completions", "/stream"):
            async with http.post(gateway.v1 + path, json=chat("hi", model="unknown")) as resp:
                assert resp.status == 404
                body = await resp.json()
            assert set(body["error"]) >= {"message", "type", "code"}
            assert body["error"]["code"] == "model_not_found"
            assert body["error"]["type"] == "invalid_request_error"
            assert "unknown" in body["error"]["message"]
        text, _, _ = await stream_text(http, gateway, "still serving", model="known")
    assert text == expected("still serving")
    assert len(only.log.records) == 1


async def test_models_lists_the_union_and_readyz_needs_one_upstream(routed, sim_factory):
    anyone = await sim_factory(FAST_SIM)
    gateway = await routed(
        upstream("named", refused_url(), models='["named-model"]')
        + upstream("anyone", anyone.url, priority=1)
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.v1 + "/models") as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
        async with http.get(gateway.url + "/readyz") as resp:
            ready = (resp.status, await resp.json())
        await anyone.aclose()
        async with http.get(gateway.url + "/readyz") as resp:
            unready = (resp.status, await resp.json())
    # The names the file gives, then what the "*" upstream lists itself.
    assert listed == ["named-model"] + [m["id"] for m in SIM_MODELS]
    assert ready[0] == 200 and ready[1]["upstreams"]["named"] == "ConnectionRefusedError"
    assert unready[0] == 503 and unready[1]["upstreams"] == {
        "named": "ConnectionRefusedError", "anyone": "ConnectionRefusedError"}


async def test_retrieving_a_model_passes_over_an_upstream_that_cannot_answer(
        routed, sim_factory):
    """GET /v1/models/{id} asks each "*" upstream in turn: one that is down
    is left out, as it is of the list, and the next one answers."""
    anyone = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("down", refused_url()) + upstream("anyone", anyone.url))
    model_id = SIM_MODELS[0]["id"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.v1}/models/{model_id}") as resp:
            retrieved = (resp.status, await resp.json())
        async with http.get(gateway.v1 + "/models/no-such-model") as resp:
            unknown = (resp.status, await resp.json())
    assert retrieved[0] == 200 and retrieved[1]["id"] == model_id, retrieved
    # Known to none that answered: unknown, as the list says.
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "model_not_found", unknown


# -- the circuit breaker ----------------------------------------------------------


async def test_the_circuit_half_opens_after_its_cooldown_and_a_probe_closes_it(routed, sim_factory):
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=503))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(
        upstream("primary", primary.url) + upstream("backup", backup.url, priority=1)
        + "[routing]\ncircuit_failures = 2\ncircuit_cooldown_ms = 300\n"
    )
    async with aiohttp.ClientSession() as http:
        for n in range(4):
            await stream_text(http, gateway, f"before {n}")
        assert len(primary.log.records) == 2
        assert (await metrics(http, gateway)).one("gateway_upstream_circuit_open",
                                                  upstream="primary") == 1
        primary.app.profile = primary.profile.without_faults()  # it recovers
        await asyncio.sleep(0.35)  # the cooldown itself is what is under test
        for n in range(3):
            text, _, _ = await stream_text(http, gateway, f"after {n}")
            assert text == expected(f"after {n}")
        scraped = await metrics(http, gateway)
    assert [r.outcome for r in primary.log.records] == ["failed"] * 2 + ["complete"] * 3
    assert len(backup.log.records) == 4
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 0


async def test_a_redirect_counts_against_its_upstream_not_as_the_requests_4xx(
        routed, sim_factory):
    """An upstream that answers 301 (its address changed) fails every
    request, whatever the request: an upstream error ("other"), not a 4xx
    of the client's. Not retried, but counted: its circuit opens, and the
    next requests go to the backup."""
    backup = await sim_factory(FAST_SIM)
    async with faulty_upstream() as primary:
        gateway = await routed(
            f'[[upstream]]\nname = "primary"\nurl = "{primary.url}"\nprotocol = "http1"\n'
            + upstream("backup", backup.url, priority=1) + ROUTING
        )
        statuses = []
        async with aiohttp.ClientSession() as http:
            for n in range(CIRCUIT_FAILURES + 2):
                async with http.post(gateway.v1 + "/chat/completions",
                                     json=chat(f"moved {n}", stream=False)) as resp:
                    statuses.append(resp.status)
            scraped = await metrics(http, gateway)
    assert statuses == [502] * CIRCUIT_FAILURES + [200] * 2
    assert primary.requests == CIRCUIT_FAILURES
    assert len(backup.log.records) == 2
    assert scraped.one("gateway_upstream_failures_total", upstream="primary",
                       kind="other") == CIRCUIT_FAILURES
    assert scraped.value("gateway_upstream_retries_total") == 0
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 1


async def test_a_retry_skips_an_open_circuit_while_another_circuit_is_closed(
        routed, sim_factory):
    """The primary's circuit is open; the backup fails one request with a
    500: the retry goes to the backup again, whose circuit is closed, not to
    the primary it has not tried (panic mode is for every circuit open)."""
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=500))
    backup = await sim_factory(FAST_SIM)
    gateway = await routed(upstream("primary", primary.url)
                           + upstream("backup", backup.url, priority=1) + ROUTING)
    async with aiohttp.ClientSession() as http:
        for n in range(CIRCUIT_FAILURES):
            await stream_text(http, gateway, f"opening {n}")
        assert [r.status for r in primary.log.records] == [500] * CIRCUIT_FAILURES
        # The backup's next request only gets a 500.
        backup.app.profile = dataclasses.replace(FAST_SIM, fail_status=500,
                                                 fault_requests=CIRCUIT_FAILURES + 1)
        text, _, frames = await stream_text(http, gateway, "once more")
        scraped = await metrics(http, gateway)
    assert text == expected("once more") and only_pings_then_the_answer(frames)
    assert [r.status for r in primary.log.records] == [500] * CIRCUIT_FAILURES
    assert [r.status for r in backup.log.records] == [200] * CIRCUIT_FAILURES + [500, 200]
    assert scraped.one("gateway_upstream_circuit_open", upstream="primary") == 1


async def test_readyz_checks_an_upstream_whose_circuit_is_half_open(routed, sim_factory):
    """A half-open circuit takes requests (its probe): /readyz checks that
    upstream as any other, rather than call it open and hang readiness on
    the others, here one that serves another model and is down."""
    primary = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=503))
    gateway = await routed(
        upstream("primary", primary.url)
        + upstream("other", refused_url(), models='["other-model"]')
        + "[routing]\ncircuit_failures = 2\ncircuit_cooldown_ms = 300\n"
    )
    async with aiohttp.ClientSession() as http:
        for n in range(2):
            async with http.post(gateway.v1 + "/chat/completions",
                                 json=chat(f"failing {n}", stream=False)) as resp:
                assert resp.status == 502
        primary.app.profile = primary.profile.without_faults()  # it recovers
        await asyncio.sleep(0.35)  # the cooldown itself is what is under test
        async with http.get(gateway.url + "/readyz") as resp:
            ready = (resp.status, await resp.json())
        text, _, _ = await stream_text(http, gateway, "the probe")
    assert ready[0] == 200, ready
    assert ready[1]["upstreams"] == {"primary": "ok", "other": "ConnectionRefusedError"}
    assert text == expected("the probe")


# -- retrying the same upstream --------------------------------------------------


async def test_one_upstream_429_is_retried_after_its_retry_after(routed, sim_factory):
    only = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=429, retry_after_s=1,
                                                 fault_requests=1))
    gateway = await routed(upstream("only", only.url))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        started = loop.time()
        text, _, frames = await stream_text(http, gateway, "patience")
        waited = loop.time() - started
    assert text == expected("patience") and only_pings_then_the_answer(frames)
    assert [r.status for r in only.log.records] == [429, 200]
    assert waited >= 1.0


async def one_429_not_waited_for(http: aiohttp.ClientSession, gateway: Routed, only: Any,
                                 prompt: str) -> None:
    """The request fails at once with the upstream's 429 and its Retry-After:
    one attempt, no retry, the upstream asked once."""
    async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt, stream=False)) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        assert (await resp.json())["error"] == {"message": "simulated failure (status 429)",
                                                "type": "rate_limit_error",
                                                "code": "rate_limit_exceeded"}
    scraped = await metrics(http, gateway)
    assert [r.status for r in only.log.records] == [429]
    assert scraped.one("gateway_upstream_failures_total", upstream="only", kind="429") == 1
    assert scraped.value("gateway_upstream_retries_total") == 0


async def test_a_retry_after_longer_than_max_retry_after_ms_is_not_waited_for(routed, sim_factory):
    """A Retry-After of 2 s against max_retry_after_ms = 1000: the only
    upstream is not waited for, though the first-token deadline (60 s) would
    allow it; the client gets the 429 (its SDK may wait, not the gateway)."""
    only = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=429, retry_after_s=2,
                                                 fault_requests=1))
    gateway = await routed(upstream("only", only.url) + "[routing]\nmax_retry_after_ms = 1000\n")
    async with aiohttp.ClientSession() as http:
        await one_429_not_waited_for(http, gateway, only, "capped")


async def test_a_retry_after_ending_past_the_first_token_deadline_is_not_waited_for(
    routed, sim_factory
):
    """A Retry-After of 2 s, within max_retry_after_ms (10 s), but ending
    past the 1 s first-token deadline: no retry could bring the first token
    in time, so the request fails at once with the 429 rather than wait and
    then time out."""
    only = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=429, retry_after_s=2,
                                                 fault_requests=1))
    gateway = await routed(upstream("only", only.url), upstream_first_token_timeout_ms=1000)
    async with aiohttp.ClientSession() as http:
        await one_429_not_waited_for(http, gateway, only, "past the deadline")


async def test_one_upstream_connection_lost_before_the_first_token_is_retried(gateway_factory):
    """The environment setup (UPSTREAM_URL, one upstream): the connection
    dies after the response head, before any token; the client sees pings
    and then the whole answer from the second attempt."""
    gateway = await gateway_factory(dataclasses.replace(FAST_SIM, kill_after=0, fault_requests=1))
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat("dropped")) as resp:
            frames = await FrameReader(resp).rest()
    assert openai_text(frames) == expected("dropped")
    assert only_pings_then_the_answer(frames)
    assert [r.outcome for r in gateway.sim.log.records] == ["failed", "complete"]


def test_a_first_token_timeout_at_the_deadline_is_not_sent_again_under_uvloop():
    """One upstream that never sends a first token: each request's attempt
    waits to the first-token deadline, and its timeout is the deadline's,
    not a reason for a second attempt (which would start the generation
    again upstream only to reset it). uvloop's clock is in whole, cached
    milliseconds, so the attempt's timer may fire a little before the
    request's deadline reads as passed."""
    uvloop = pytest.importorskip("uvloop")
    requests = 60

    async def main() -> tuple[int, float]:
        sim = SimServer(dataclasses.replace(FAST_SIM, ttft_ms=60_000))
        await sim.start()
        try:
            settings = Settings(host="127.0.0.1", port=0, upstream_url=sim.url,
                                upstream_protocol="h2c", upstream_first_token_timeout_ms=50)
            async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:

                async def times_out(prompt: str) -> None:
                    async with http.post(url + "/v1/chat/completions",
                                         json=chat(prompt, stream=False)) as resp:
                        assert resp.status == 504

                for burst in range(3):
                    await asyncio.gather(*(times_out(f"never {burst} {n}")
                                           for n in range(requests // 3)))
                retries = (await scrape(http, url)).value("gateway_upstream_retries_total")
            return len(sim.log.records), retries
        finally:
            await sim.aclose()

    sent, retries = uvloop.run(main())
    assert (sent, retries) == (requests, 0)


def test_a_wait_for_an_upstream_slot_cut_at_the_deadline_is_not_retried_under_uvloop():
    """An upstream at its max_inflight (1) whose answers never start: the
    other requests of each burst wait for its slot until their first-token
    deadline. That wait's end is the deadline's, as the timeout of the
    stream holding the slot is: no retry follows either, though
    uvloop's cached millisecond clock may fire the timers a little before
    the deadline reads as passed."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[list[int], float]:
        sim = SimServer(dataclasses.replace(FAST_SIM, ttft_ms=60_000))
        await sim.start()
        try:
            settings = Settings(
                host="127.0.0.1", port=0, upstream_first_token_timeout_ms=50,
                routing=parse_routing(upstream("only", sim.url, extra="max_inflight = 1"), {}),
            )
            async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:

                async def status(prompt: str) -> int:
                    async with http.post(url + "/v1/chat/completions",
                                         json=chat(prompt, stream=False)) as resp:
                        return resp.status

                statuses = []
                for burst in range(10):
                    statuses += await asyncio.gather(*(status(f"never {burst} {n}")
                                                       for n in range(40)))
                retries = (await scrape(http, url)).value("gateway_upstream_retries_total")
            return statuses, retries
        finally:
            await sim.aclose()

    statuses, retries = uvloop.run(main())
    assert set(statuses) <= {503, 504} and retries == 0, (sorted(set(statuses)), retries)


async def test_one_upstream_resends_a_lost_connection_while_a_429_holds_it_off(
        gateway_factory):
    """The environment setup: one request gets a 429 with Retry-After: 30;
    the next one goes anyway (a 429 may be about that one request) and its
    connection dies before any token. That request is sent once more at
    once, as any connection lost before the first token is: the hold is
    for retrying the 429, not a reason to fail (or stall) another request."""
    gateway = await gateway_factory(dataclasses.replace(FAST_SIM, kill_after=0, fault_requests=2))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat(
                "slow down [sim fail_status=429 retry_after_s=30]", stream=False)) as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (429, "30")
        started = loop.time()
        async with http.post(gateway.v1 + "/chat/completions",
                             json=chat("dropped once", stream=False)) as resp:
            assert resp.status == 200
            body = await resp.json()
        took = loop.time() - started
    assert body["choices"][0]["message"]["content"] == expected("dropped once")
    assert [(r.status, r.outcome) for r in gateway.sim.log.records] == [
        (429, "failed"), (200, "failed"), (200, "complete")]
    assert took < 5, took  # generous: the point is "not after a wait for the hold"


async def test_one_upstream_keeps_its_error_status_without_retry(gateway_factory):
    """The environment setup retries no error status: a 503 reaches the
    client once, as it always did."""
    gateway = await gateway_factory(dataclasses.replace(FAST_SIM, fail_status=503))
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions",
                             json=chat("no retry", stream=False)) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_503"
    assert len(gateway.sim.log.records) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstream_refusing_our_key_is_a_502_not_the_clients_401(gateway_factory, status):
    """401 tells a client that its own key is wrong; the upstream refusing
    the gateway's key is an upstream error, told in our words, and retrying
    the same upstream with the same key would not help."""
    gateway = await gateway_factory(dataclasses.replace(FAST_SIM, fail_status=status))
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions",
                             json=chat("revoked", stream=False)) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
    assert (error["code"], error["type"]) == ("upstream_auth_error", "upstream_error")
    # Not the provider's message: it would tell the client its own key is
    # wrong, and quote a fingerprint of ours ("Incorrect API key provided: sk-...").
    assert error["message"] == "the upstream refused the gateway's credentials"
    assert len(gateway.sim.log.records) == 1


async def test_the_retry_budget_bounds_retries_when_everything_fails(routed, sim_factory):
    broken = [await sim_factory(dataclasses.replace(FAST_SIM, fail_status=500)) for _ in range(2)]
    gateway = await routed(
        upstream("a", broken[0].url) + upstream("b", broken[1].url)
        + "[routing]\nmax_attempts = 2\nretry_budget_min = 3\nretry_budget_ratio = 0.0\n"
        + "circuit_failures = 1000\n"
    )
    async with aiohttp.ClientSession() as http:
        for n in range(6):
            async with http.post(gateway.v1 + "/chat/completions",
                                 json=chat(f"doomed {n}", stream=False)) as resp:
                assert resp.status == 502
        scraped = await metrics(http, gateway)
    # 6 first attempts and the 3 retries the budget allows, then no more.
    assert len(broken[0].log.records) + len(broken[1].log.records) == 9
    assert scraped.value("gateway_upstream_retries_total") == 3


async def test_a_client_gone_during_the_retry_wait_leaves_nothing_open(routed, sim_factory):
    only = await sim_factory(dataclasses.replace(FAST_SIM, fail_status=429, retry_after_s=5,
                                                 fault_requests=1))
    gateway = await routed(upstream("only", only.url))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.v1 + "/chat/completions", json=chat("impatient"))
        await only.log.wait_for(1)
        resp.close()
        async with asyncio.timeout(5):
            await gateway.state.registry.wait_idle()
    assert [r.status for r in only.log.records] == [429]
    assert gateway.state.router.upstreams[0].in_flight == 0


async def test_sim_faults_strike_the_first_requests_only(sim_factory):
    """The simulator's fault_requests knob: the first N model requests get
    the process's faults, the rest a healthy answer."""
    sim = await sim_factory(SimProfile(fail_status=503, fault_requests=2, ttft_ms=1, itl_ms=0,
                                       tokens=2))
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(4):
            async with http.post(sim.url + "/chat/completions", json=chat("n", stream=False)) as r:
                statuses.append(r.status)
    assert statuses == [503, 503, 200, 200]
