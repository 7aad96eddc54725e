"""The TTFT suite can pass, and -- the point of a guardrail -- it can fail.

Each failure test builds a system that is really broken in one way (no
coalescing, a slow model, a proxy that does not propagate cancellation) and
runs the suite's own phases against it over real sockets: nothing of the
suite is mocked. The happy path runs ``python -m gateway.suite`` as
``make ttft`` does, with small counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from gateway.sim.profile import SimProfile
from gateway.suite import Endpoints, SuiteConfig, run_suite
from gateway.suite.config import Thresholds
from gateway.suite.loadgen import LoadShape, arrival_gaps, drive
from gateway.suite.report import FAIL, passed, verdicts
from gateway.suite.stats import histogram_quantile, percentile
from tests.conftest import SimFactory
from tests.integration.conftest import GatewayFactory
from tests.integration.stubborn_proxy import StubbornProxy

REPO = Path(__file__).resolve().parents[2]

#: Slow enough a first token that 50 concurrent clients all arrive before it.
BURST_SIM = SimProfile(ttft_ms=200, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0, tokens=16)

VERDICT_LINES = (
    re.compile(r"^TTFT \(streaming\) p95: \d+ ms \(<= 1500\) PASS$"),
    re.compile(r"^Cancel latency p95: \d+\.\d ms \(< 300\) PASS$"),
    re.compile(r"^Queue wait p95 \(TTFT run\): \d+\.\d ms \(~ 0\) PASS$"),
)


def small(**overrides: Any) -> SuiteConfig:
    """A quick run: few requests, no warm-up."""
    quick = SuiteConfig(
        load=LoadShape(concurrency=8), requests=8, warmup=0, max_tokens=8, cancels=3, cancel_wait_s=2.0
    )
    return dataclasses.replace(quick, **overrides)


def line(report_lines: list[str], prefix: str) -> str:
    return next(text for text in report_lines if text.startswith(prefix))


# -- the suite fails where the system is broken ----------------------------------------


async def test_burst_without_coalescing_reports_an_upstream_call_per_client(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = await gateway_factory(sim_profile=BURST_SIM, coalesce_enabled=False)
    endpoints = Endpoints(gateway.v1, sim_url=gateway.sim.url, sim_tokens=BURST_SIM.tokens)

    report = await run_suite(small(phases=frozenset({"burst"})), endpoints)

    assert report.burst is not None
    assert report.burst.upstream_calls == 50
    assert len(gateway.sim.log.records) == 50
    # Uncoalesced, every answer is still the simulator's, exactly.
    assert report.burst.successes == 50
    assert report.burst.exact is True


async def test_burst_with_coalescing_reports_one_upstream_call(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(sim_profile=BURST_SIM)
    endpoints = Endpoints(gateway.v1, sim_url=gateway.sim.url, sim_tokens=BURST_SIM.tokens)

    report = await run_suite(small(phases=frozenset({"burst"})), endpoints)

    assert report.burst is not None
    assert (report.burst.upstream_calls, report.burst.successes) == (1, 50)
    assert report.burst.identical and report.burst.exact is True
    assert gateway.state.registry.statistics().followers_total == 49


async def test_a_three_second_first_token_fails_the_ttft_line(gateway_factory: GatewayFactory) -> None:
    slow = SimProfile(ttft_ms=3000, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0, tokens=4)
    gateway = await gateway_factory(sim_profile=slow)
    endpoints = Endpoints(gateway.v1, sim_url=gateway.sim.url, sim_tokens=slow.tokens)

    report = await run_suite(small(requests=4, phases=frozenset({"ttft"})), endpoints)

    assert report.ttft is not None
    assert (report.ttft.completed, report.ttft.failed) == (4, 0)
    assert report.ttft.ttft.p95 is not None and report.ttft.ttft.p95 >= 3000
    assert report.ttft.direct_ttft is not None and report.ttft.direct_ttft.count == 4
    lines = [verdict.line for verdict in verdicts(report)]
    assert re.fullmatch(r"TTFT \(streaming\) p95: 3\d{3} ms \(<= 1500\) FAIL", lines[0])
    assert not passed(report)


async def test_a_gateway_that_queues_fails_the_queue_wait_line(gateway_factory: GatewayFactory) -> None:
    # Two upstream slots for eight concurrent streams of ~80 ms: most wait.
    profile = SimProfile(ttft_ms=50, ttft_jitter_ms=0, itl_ms=2, itl_jitter_ms=0, tokens=16)
    gateway = await gateway_factory(sim_profile=profile, max_inflight=2)
    endpoints = Endpoints(gateway.v1, sim_url=gateway.sim.url)

    report = await run_suite(small(requests=8, baseline=False, phases=frozenset({"ttft"})), endpoints)

    assert report.ttft is not None and report.ttft.completed == 8
    assert report.ttft.queue_wait.p95 is not None and report.ttft.queue_wait.p95 > 50
    queue_line = verdicts(report)[2]
    assert queue_line.status == FAIL
    assert re.fullmatch(r"Queue wait p95 \(TTFT run\): \d+\.\d ms \(~ 0\) FAIL", queue_line.line)


@pytest.fixture
async def stubborn_proxy_factory() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    proxies: list[StubbornProxy] = []

    async def start(upstream_url: str) -> str:
        proxy = StubbornProxy(upstream_url)
        proxies.append(proxy)
        return await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.aclose()


async def test_a_face_that_does_not_propagate_cancellation_fails_the_cancel_line(
    sim_factory: SimFactory, stubborn_proxy_factory: Callable[[str], Awaitable[str]]
) -> None:
    # 400 tokens 2 ms apart: a mid-stream cancel leaves ~0.8 s of stream
    # that a broken face reads on; a pre-token one ~2 s.
    sim = await sim_factory(SimProfile(ttft_ms=20, ttft_jitter_ms=0, itl_ms=2, itl_jitter_ms=0))
    proxy_url = await stubborn_proxy_factory(sim.url)

    report = await run_suite(
        small(phases=frozenset({"cancel"}), cancels=2), Endpoints(proxy_url, sim_url=sim.url)
    )

    cancel = report.cancel
    assert cancel is not None
    assert (cancel.attempted, cancel.aborted) == (4, 4)
    # The upstream saw no cancel at all: each request ran on (or still runs).
    assert set(cancel.outcomes) <= {"complete", "pending"}
    assert cancel.p95_ms is not None and cancel.p95_ms > 300
    cancel_line = [verdict.line for verdict in verdicts(report)][1]
    assert re.fullmatch(r"Cancel latency p95: \d+\.\d ms \(< 300\) FAIL", cancel_line)


async def test_the_gateway_cancels_upstream_within_milliseconds(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(
        sim_profile=SimProfile(ttft_ms=20, ttft_jitter_ms=0, itl_ms=2, itl_jitter_ms=0)
    )
    endpoints = Endpoints(gateway.v1, sim_url=gateway.sim.url)

    report = await run_suite(small(phases=frozenset({"cancel"}), cancels=2), endpoints)

    cancel = report.cancel
    assert cancel is not None
    assert (cancel.aborted, cancel.observed, cancel.unresolved) == (4, 4, 0)
    assert cancel.outcomes == {"reset": 4}
    assert cancel.p95_ms is not None and cancel.p95_ms < 300  # generous: a noisy machine


async def test_against_a_target_the_figures_come_from_its_metrics(gateway_factory: GatewayFactory) -> None:
    """``--target``: no simulator beside the gateway; upstream calls and
    cancel latency are read from the gateway's /metrics."""
    gateway = await gateway_factory(
        sim_profile=SimProfile(ttft_ms=200, ttft_jitter_ms=0, itl_ms=2, itl_jitter_ms=0)
    )
    config = small(phases=frozenset({"burst", "cancel"}), target=gateway.v1, baseline=False)

    report = await run_suite(config, Endpoints(gateway.v1))

    assert report.burst is not None and report.cancel is not None
    assert report.burst.upstream_calls == 1
    assert report.burst.exact is None  # no simulator: no reference answer
    assert report.cancel.observed == report.cancel.aborted == 6
    assert report.cancel.p95_ms is not None and report.cancel.p95_ms < 300


# -- the happy path: make ttft -----------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment holds ``marker``: the suite's children inherit it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def test_make_ttft_passes_and_ends_with_the_three_lines(tmp_path: Path) -> None:
    marker = f"TTFT_SUITE_TEST={uuid.uuid4().hex}"
    report_path = tmp_path / "ttft-report.json"
    completed = subprocess.run(
        [
            sys.executable, "-m", "gateway.suite",
            "--requests", "40", "--concurrency", "8", "--warmup", "4", "--cancels", "4",
            "--report", str(report_path),
        ],
        cwd=REPO,
        env={**os.environ, "CI": "true", marker.split("=")[0]: marker.split("=")[1]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = completed.stdout.rstrip("\n").split("\n")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "\r" not in completed.stdout  # quiet in CI: no progress counter
    for pattern, text in zip(VERDICT_LINES, lines[-3:], strict=True):
        assert pattern.match(text), text
    report = json.loads(report_path.read_text())
    assert (report["completed"], report["failed"]) == (40, 0)
    assert report["burst_upstream_calls"] == 1 and report["burst_exact_content"] is True
    assert report["cancel_outcomes"] == {"reset": 8}
    assert report["passed"] is True
    for key in ("p95_ttft_ms", "p95_queue_wait_ms", "p95_cancel_ms", "median_overhead_ms"):
        assert isinstance(report[key], float), key
    assert _processes_with(marker) == []  # the simulator and the gateway are gone


def test_smoke_ttft_reports_an_early_first_byte() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "gateway.suite.smoke"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    last = completed.stdout.rstrip("\n").split("\n")
    assert re.fullmatch(r"Time to first token: 1\d{3} ms", last[-2])
    assert re.fullmatch(r"Time to first byte: \d+\.\d ms \(<= 100\) PASS", last[-1])


# -- the load shapes and the statistics ----------------------------------------------------


def test_open_loop_arrivals_are_seeded_gamma_with_the_requested_mean() -> None:
    def gaps(seed: int, burstiness: float) -> list[float]:
        source = arrival_gaps(50.0, burstiness, random.Random(seed))
        return [next(source) for _ in range(4000)]

    assert gaps(7, 1.0) == gaps(7, 1.0)
    assert gaps(7, 1.0) != gaps(8, 1.0)
    for burstiness in (0.5, 1.0, 4.0):
        sample = gaps(1, burstiness)
        assert sum(sample) / len(sample) == pytest.approx(1 / 50, rel=0.1)
    # Burstier arrivals spread wider around the same mean.
    bursty, regular = percentile(gaps(1, 0.5), 95), percentile(gaps(1, 4.0), 95)
    assert bursty is not None and regular is not None and bursty > regular


async def test_the_concurrency_cap_holds_and_results_keep_job_order() -> None:
    in_flight = peak = 0

    def job(index: int) -> Callable[[], Coroutine[Any, Any, int]]:
        async def run() -> int:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            for _ in range(index % 3 + 1):
                await asyncio.sleep(0)  # interleave the jobs
            in_flight -= 1
            return index

        return run

    for shape in (LoadShape(concurrency=3), LoadShape(concurrency=3, rate=5000.0, seed=1)):
        peak = 0
        assert await drive([job(i) for i in range(20)], shape) == list(range(20))
        assert peak == 3


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 10 observations: 4 <= 1 ms, 6 in (1, 5] ms, none above.
    buckets = [(0.001, 4.0), (0.005, 10.0), (float("inf"), 10.0)]
    assert histogram_quantile(50, buckets) == pytest.approx(0.001 + 0.004 * (1 / 6))
    assert histogram_quantile(95, buckets) == pytest.approx(0.001 + 0.004 * (5.5 / 6))
    assert histogram_quantile(50, [(float("inf"), 0.0)]) is None


def test_thresholds_are_the_go_no_go_lines() -> None:
    thresholds = Thresholds()
    assert (thresholds.ttft_p95_ms, thresholds.cancel_p95_ms) == (1500, 300)
