"""``/metrics`` and ``/stats`` after real traffic through gateway + simulator.

Everything runs in one event loop, so when a client has read a response to
its end the handler has already passed the middleware's bookkeeping: the
counters are final by then, no waiting needed. The gauges are read at scrape
time from live state, so "back to 0" is checked after the registry is idle.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import aiohttp

from gateway.app import running_gateway
from gateway.config import Settings
from tests.integration.conftest import HELD_SIM, subscribed, upstream_held
from tests.integration.metrics_scrape import CONTRACT_METRICS, Scrape, missing, scrape
from tests.integration.sse_frames import FrameReader

GUARD_S = 10


def chat(prompt: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": stream}


async def read_stream(http: aiohttp.ClientSession, url: str, prompt: str) -> list:
    async with http.post(url, json=chat(prompt)) as resp:
        assert resp.status == 200
        return await FrameReader(resp).rest()


async def wait_idle(gateway) -> None:
    async with asyncio.timeout(GUARD_S):
        await gateway.state.registry.wait_idle()


def assert_idle_gauges(metrics: Scrape) -> None:
    for gauge in ("gateway_active_streams", "gateway_active_actors", "gateway_queue_depth"):
        assert metrics.one(gauge) == 0, gauge


async def test_every_metric_of_the_architecture_table_is_exposed(gateway):
    async with aiohttp.ClientSession() as http:
        metrics = await scrape(http, gateway.url)
    assert missing(CONTRACT_METRICS, metrics.exposed_names()) == []
    assert metrics.types["gateway_ttft_seconds"] == "histogram"
    assert metrics.types["gateway_coalesce"] == "counter"
    assert metrics.types["gateway_error_ratio_last_100"] == "gauge"
    # The labelled children exist from the start, so rate() has a zero to start from.
    assert metrics.label_values("gateway_requests_total", "api") == {"openai", "native", "anthropic"}
    assert metrics.label_values("gateway_ttft_seconds_count", "role") == {"leader", "follower"}
    assert metrics.value("gateway_requests_total") == 0
    assert metrics.one("gateway_error_ratio_last_100") == 0
    assert_idle_gauges(metrics)


async def test_a_burst_counts_per_outcome_role_and_api(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "metrics burst [sim ttft_ms=300 tokens=40 itl_ms=5]"
    openai_url, native_url = gateway.v1 + "/chat/completions", gateway.v1 + "/stream"
    async with aiohttp.ClientSession() as http:
        # The upstream holds the leader's request until every follower is
        # in: the counts below do not depend on how fast they arrive.
        async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                clients.create_task(read_stream(http, openai_url, prompt))
                await gateway.sim.log.wait_for_arrivals(1)
                for url in [openai_url] * 6 + [native_url] * 4:
                    clients.create_task(read_stream(http, url, prompt))
                await subscribed(gateway, 11)
        await wait_idle(gateway)
        metrics = await scrape(http, gateway.url)
        async with http.get(gateway.url + "/stats") as resp:
            stats = await resp.json()

    assert len(gateway.sim.log.records) == 1
    assert metrics.one("gateway_requests_total", api="openai", outcome="ok") == 7
    assert metrics.one("gateway_requests_total", api="native", outcome="ok") == 4
    assert metrics.value("gateway_requests_total") == 11
    assert metrics.one("gateway_coalesce_total", role="leader") == 1
    assert metrics.one("gateway_coalesce_total", role="follower") == 10
    # One TTFT observation per streamed request, under its API and role.
    assert metrics.one("gateway_ttft_seconds_count", api="openai", role="leader") == 1
    assert metrics.one("gateway_ttft_seconds_count", api="openai", role="follower") == 6
    assert metrics.one("gateway_ttft_seconds_count", api="native", role="follower") == 4
    assert metrics.one("gateway_ttft_seconds_count", api="native", role="leader") == 0
    # Every request waited at least the simulated 300 ms for its first token.
    assert metrics.one("gateway_ttft_seconds_bucket", api="openai", role="leader", le="0.3") == 0
    assert metrics.one("gateway_queue_wait_seconds_count") == 11
    assert metrics.one("gateway_request_duration_seconds_count") == 11
    assert metrics.one("gateway_upstream_requests_total", status="200") == 1
    assert metrics.one("gateway_upstream_connections") == 1
    assert metrics.one("gateway_upstream_resets_total") == 0
    assert metrics.one("gateway_cancel_seconds_count") == 0
    assert metrics.one("gateway_error_ratio_last_100") == 0
    assert_idle_gauges(metrics)

    assert set(stats) >= {
        "ttft_ms", "queue_wait_ms", "error_rate", "requests_in_window", "coalesce",
        "active_streams", "active_actors", "queue_depth", "upstream_connections",
    }
    assert stats["ttft_ms"]["samples"] == 11
    # Followers arrived after the leader; the leader's wait (the slowest) is the p95.
    assert 0 < stats["ttft_ms"]["p50"] <= stats["ttft_ms"]["p95"] < GUARD_S * 1000
    assert stats["ttft_ms"]["p95"] >= 300
    assert stats["queue_wait_ms"]["samples"] == 11
    assert 0 <= stats["queue_wait_ms"]["p95"] < 1000
    assert stats["error_rate"] == 0 and stats["requests_in_window"] == 11
    assert stats["coalesce"] == {"leaders": 1, "followers": 10}
    assert (stats["active_streams"], stats["active_actors"], stats["queue_depth"]) == (0, 0, 0)
    assert stats["upstream_connections"] == 1


async def test_gauges_in_flight_then_cancel_latency_after_the_last_client_leaves(gateway_factory):
    # One upstream slot: stream A (three subscribers) holds it, B queues.
    gateway = await gateway_factory(max_inflight=1)
    held, queued = chat("held [sim ttft_ms=10000]"), chat("queued behind")
    url = gateway.v1 + "/stream"
    async with aiohttp.ClientSession() as http:
        subscribers = []
        for _ in range(3):
            resp = await http.post(url, json=held)
            assert (await FrameReader(resp).next()).comment == "ping"
            subscribers.append(resp)
            await gateway.sim.log.wait_for_arrivals(1)
        waiting = await http.post(url, json=queued)
        assert (await FrameReader(waiting).next()).comment == "ping"

        in_flight = await scrape(http, gateway.url)
        assert in_flight.one("gateway_active_streams") == 4
        assert in_flight.one("gateway_active_actors") == 2
        assert in_flight.one("gateway_queue_depth") == 1
        assert in_flight.one("gateway_upstream_connections") == 1

        # B leaves while queued (explicit cancel): nothing upstream to reset.
        request_id = waiting.headers["X-Request-Id"]
        async with http.post(gateway.v1 + f"/requests/{request_id}/cancel") as resp:
            assert resp.status == 202
        frames = await FrameReader(waiting).rest()
        waiting.release()
        assert frames[-1].event == "done" and frames[-1].json()["finish_reason"] == "cancelled"

        for resp in subscribers:  # A's clients drop their connections
            resp.close()
        (record,) = await gateway.sim.log.wait_for(1, outcome="reset")
        await wait_idle(gateway)
        after = await scrape(http, gateway.url)

    assert len(gateway.sim.log.records) == 1  # B never reached the upstream
    assert after.one("gateway_cancel_seconds_count") == 1
    assert 0 <= after.one("gateway_cancel_seconds_sum") < 1
    assert after.one("gateway_upstream_resets_total") == 1
    assert after.one("gateway_requests_total", api="native", outcome="cancelled") == 4
    assert after.value("gateway_ttft_seconds_count") == 0  # no content ever reached a client
    # A's three clients were admitted (the followers at once) and left before
    # the first token: each counts its wait; B was never admitted: no wait.
    assert after.one("gateway_queue_wait_seconds_count") == 3
    # Cancelled clients are not failures, and not in the error window at all.
    assert after.one("gateway_error_ratio_last_100") == 0
    assert_idle_gauges(after)


async def test_failures_count_in_the_error_ratio_and_a_cancel_does_not(gateway):
    url = gateway.v1 + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            await read_stream(http, url, f"fine {n}")
        failed = await read_stream(http, url, "broken stream [sim fail_status=500]")
        assert "error" in failed[-1].json()
        async with http.post(url, json=chat("broken json [sim fail_status=500]", stream=False)) as r:
            assert r.status == 502
            await r.read()
        # A client that leaves mid-stream: the upstream had answered 200.
        resp = await http.post(url, json=chat("walks away [sim itl_ms=50 tokens=200]"))
        reader = FrameReader(resp)
        while (frame := await reader.next()) is not None and not (frame.data or "").startswith("{"):
            pass
        resp.close()
        await gateway.sim.log.wait_for(1, outcome="reset")
        await wait_idle(gateway)
        metrics = await scrape(http, gateway.url)
        async with http.get(gateway.url + "/stats") as stats_resp:
            stats = json.loads(await stats_resp.text())

    assert metrics.one("gateway_requests_total", api="openai", outcome="ok") == 3
    assert metrics.one("gateway_requests_total", api="openai", outcome="error") == 2
    assert metrics.one("gateway_requests_total", api="openai", outcome="cancelled") == 1
    assert metrics.one("gateway_upstream_requests_total", status="500") == 2
    assert metrics.one("gateway_upstream_requests_total", status="200") == 4
    assert metrics.one("gateway_upstream_resets_total") == 1
    assert metrics.one("gateway_cancel_seconds_count") == 1
    # 2 failed of 5 served; the cancelled one is not in the window.
    assert metrics.one("gateway_error_ratio_last_100") == 0.4
    assert stats["error_rate"] == 0.4 and stats["requests_in_window"] == 5
    assert stats["ttft_ms"]["samples"] == 4  # three complete streams and the abandoned one
    # Admitted, then failed before the first token: still a queue wait each.
    assert metrics.one("gateway_queue_wait_seconds_count") == 6
    assert stats["queue_wait_ms"]["samples"] == 6
    assert_idle_gauges(metrics)


async def test_invalid_requests_are_counted_but_not_failures(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", data=b"{nope",
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
        await read_stream(http, gateway.v1 + "/chat/completions", "a fine one")
        metrics = await scrape(http, gateway.url)
    assert metrics.one("gateway_requests_total", api="openai", outcome="rejected") == 1
    assert metrics.one("gateway_requests_total", api="openai", outcome="ok") == 1
    assert metrics.one("gateway_error_ratio_last_100") == 0


async def test_openmetrics_is_negotiated(gateway):
    async with aiohttp.ClientSession() as http, http.get(
        gateway.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    ) as resp:
        body = await resp.text()
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "gateway_ttft_seconds_bucket" in body


async def test_metrics_are_compressed_when_the_scraper_asks(gateway):
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(gateway.url + "/metrics", headers={"Accept-Encoding": "gzip"}) as resp:
            body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert b"gateway_ttft_seconds_bucket" in gzip.decompress(body)
        async with http.get(gateway.url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
            plain = await resp.read()
        assert "Content-Encoding" not in resp.headers
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    assert b"gateway_ttft_seconds_bucket" in plain


async def test_the_upstream_open_is_timed_counted_and_tracked(gateway):
    """prometheus-async around the leader's upstream open: one observation
    per upstream call (not per subscriber), nothing in progress after."""
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(read_stream(http, gateway.v1 + "/chat/completions", "opened once")
                               for _ in range(3)))
        metrics = await scrape(http, gateway.url)
    assert metrics.one("gateway_upstream_open_seconds_count") == 1
    assert metrics.one("gateway_upstream_open_failures_total") == 0
    assert metrics.one("gateway_upstream_opening") == 0


async def test_an_upstream_that_refuses_the_connection_is_an_open_failure():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(host="127.0.0.1", port=0, upstream_url=f"http://127.0.0.1:{port}/v1",
                        upstream_protocol="h2c")
    async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=chat("refused")) as resp:
            frames = await FrameReader(resp).rest()
        assert json.loads(frames[-1].data)["error"]["code"] == "upstream_connect_error"
        metrics = await scrape(http, url)
    assert metrics.one("gateway_upstream_open_failures_total") == 1
    assert metrics.one("gateway_upstream_open_seconds_count") == 1
    assert metrics.one("gateway_upstream_opening") == 0


async def test_requests_shed_from_the_queue_record_no_queue_wait(gateway_factory):
    """One slot, held. Three identical requests queue as one stream (a leader
    and two followers that take its place) and are shed together at the
    queue timeout. None was admitted: none has a queue wait to record, the
    followers no more than their leader; only the holder's is recorded."""
    gateway = await gateway_factory(max_inflight=1, max_queue=1, queue_timeout_ms=1000)
    url = gateway.v1 + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        holder = await http.post(url, json=chat("hold [sim ttft_ms=60000]"))
        assert (await FrameReader(holder).next()).comment == "ping"
        await gateway.sim.log.wait_for_arrivals(1)

        async def shed() -> str:
            async with http.post(url, json=chat("shed together", stream=False)) as resp:
                assert resp.status == 503
                return (await resp.json())["error"]["code"]

        assert await asyncio.gather(shed(), shed(), shed()) == ["queue_timeout"] * 3
        holder.close()
        await wait_idle(gateway)
        metrics = await scrape(http, gateway.url)
        async with http.get(gateway.url + "/stats") as resp:
            stats = await resp.json()
    assert metrics.one("gateway_coalesce_total", role="follower") == 2
    assert metrics.one("gateway_requests_total", api="openai", outcome="shed") == 3
    assert metrics.one("gateway_queue_wait_seconds_count") == 1
    assert stats["queue_wait_ms"]["samples"] == 1


async def test_the_reset_counter_counts_cancels_not_the_gateways_own_timeouts(gateway_factory):
    """``gateway_upstream_resets_total`` is the cancel chain's count, one
    ``gateway_cancel_seconds`` observation each: a first-token timeout also
    resets the upstream stream, but is a failure, counted as one."""
    gateway = await gateway_factory(upstream_first_token_timeout_ms=200)
    async with aiohttp.ClientSession() as http:
        frames = await read_stream(http, gateway.v1 + "/chat/completions", "late [sim ttft_ms=5000]")
        assert json.loads(frames[-1].data)["error"]["code"] == "upstream_timeout"
        await gateway.sim.log.wait_for(1, outcome="reset")
        await wait_idle(gateway)
        metrics = await scrape(http, gateway.url)
    assert metrics.one("gateway_upstream_resets_total") == 0
    assert metrics.one("gateway_cancel_seconds_count") == 0
    assert metrics.one("gateway_stream_failures_total", cause="upstream_timeout") == 1
    assert metrics.one("gateway_upstream_failures_total", upstream="default", kind="timeout") == 1
