"""The measuring phases: the TTFT run (with its error rate) and the burst.

The TTFT run sends distinct prompts at the configured load through the
gateway and, interleaved in the same run, the same prompts straight to the
simulator: the difference is the gateway's overhead, with the upstream's
behaviour (its jitter, its load at that moment) the same on both sides -- the
way to make a proxy's cost visible. Warm-up requests (connections opened,
code paths warmed) come first and are left out of every figure.

The burst sends one prompt from many clients at once: a coalescing gateway
makes one upstream call and gives every client the same, exact answer.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median

import aiohttp

from gateway.sim.content import answer_tokens
from gateway.suite.client import Abort, StreamResult, chat_body, stream_chat
from gateway.suite.config import SuiteConfig
from gateway.suite.loadgen import Job, drive
from gateway.suite.observe import MetricsSnapshot, SimLog, try_scrape
from gateway.suite.processes import Endpoints
from gateway.suite.progress import Progress
from gateway.suite.stats import Summary

GATEWAY, DIRECT = "gateway", "direct"


@dataclass(frozen=True, slots=True)
class PhaseContext:
    """What every phase uses: the run's settings, where to send, how to observe."""

    config: SuiteConfig
    endpoints: Endpoints
    session: aiohttp.ClientSession
    progress: Progress
    #: Makes this run's prompts unique: nothing coalesces with an earlier run.
    nonce: str

    @property
    def sim_log(self) -> SimLog | None:
        if self.endpoints.sim_url is None:
            return None
        return SimLog(self.session, self.endpoints.sim_url)

    async def gateway_metrics(self) -> MetricsSnapshot | None:
        """The gateway's ``/metrics`` now (None: not reachable)."""
        return await try_scrape(self.session, self.endpoints.gateway_url, api_key=self.config.api_key)

    def job(
        self, label: str, prompt: str, *, max_tokens: int | None, abort: Abort | None = None
    ) -> Job[StreamResult]:
        base = self.endpoints.gateway_url if label == GATEWAY else self.endpoints.sim_url
        assert base is not None
        url = base + "/chat/completions"
        body = chat_body(prompt, model=self.config.model, max_tokens=max_tokens)
        api_key = self.config.api_key if label == GATEWAY else None
        timeout_s = self.config.request_timeout_s

        async def send() -> StreamResult:
            return await stream_chat(
                self.session, url, body, label=label, api_key=api_key, abort=abort,
                timeout_s=timeout_s,
            )

        return send


@dataclass(frozen=True, slots=True)
class TtftRun:
    load: str
    duration_s: float
    #: Measured requests through the gateway, and how they ended.
    requests: int
    completed: int
    failed: int
    errors: Mapping[str, int]
    output_tokens: int
    ttft: Summary
    ttfb: Summary
    itl: Summary
    e2e: Summary
    queue_wait: Summary
    #: The same prompts straight to the simulator (None: no baseline).
    direct_ttft: Summary | None
    direct_failed: int
    #: Median over prompts of (TTFT via the gateway - TTFT direct).
    median_overhead_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def _plan(ctx: PhaseContext, prompts: Sequence[str], rng: random.Random) -> list[Job[StreamResult]]:
    """Each prompt through the gateway and (with a baseline) direct, the
    order within each pair drawn at random so neither side is always first."""
    jobs: list[Job[StreamResult]] = []
    max_tokens = ctx.config.max_tokens
    for prompt in prompts:
        pair = [ctx.job(GATEWAY, prompt, max_tokens=max_tokens)]
        if ctx.config.baseline and ctx.endpoints.sim_url is not None:
            pair.append(ctx.job(DIRECT, prompt, max_tokens=max_tokens))
            rng.shuffle(pair)
        jobs.extend(pair)
    return jobs


def _error_kinds(results: Sequence[StreamResult]) -> dict[str, int]:
    return dict(Counter(result.error or "incomplete" for result in results if not result.ok))


async def run_ttft(ctx: PhaseContext) -> TtftRun:
    config = ctx.config
    rng = random.Random(config.load.seed)
    loop = asyncio.get_running_loop()
    if count := config.warmup_requests:
        warmup = [f"TTFT suite {ctx.nonce} warm-up {i}: say something." for i in range(count)]
        jobs = _plan(ctx, warmup, rng)[:count]
        ctx.progress.start("warm-up (excluded)", len(jobs))
        await drive(jobs, config.load, on_done=lambda _: ctx.progress.advance())
        ctx.progress.finish()

    prompts = [
        f"TTFT suite {ctx.nonce} request {i}: tell me about topic number {i}."
        for i in range(config.requests)
    ]
    jobs = _plan(ctx, prompts, rng)
    ctx.progress.start("1. TTFT run", len(jobs))
    started = loop.time()
    results = await drive(jobs, config.load, on_done=lambda _: ctx.progress.advance())
    duration_s = loop.time() - started
    ctx.progress.finish()

    via = [result for result in results if result.label == GATEWAY]
    direct = [result for result in results if result.label == DIRECT]
    ok = [result for result in via if result.ok]
    overheads = [
        through.ttft_ms - straight.ttft_ms
        for through, straight in zip(via, direct, strict=False)
        if through.ok and straight.ok and through.ttft_ms is not None and straight.ttft_ms is not None
    ]
    return TtftRun(
        load=config.load.describe(),
        duration_s=duration_s,
        requests=len(via),
        completed=len(ok),
        failed=len(via) - len(ok),
        errors=_error_kinds(via),
        output_tokens=sum(len(result.token_times) for result in ok),
        ttft=Summary.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        ttfb=Summary.of([r.ttfb_ms for r in ok if r.ttfb_ms is not None]),
        itl=Summary.of([gap for r in ok for gap in r.itl_ms()]),
        e2e=Summary.of([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        queue_wait=Summary.of([r.queue_wait_ms for r in ok if r.queue_wait_ms is not None]),
        direct_ttft=Summary.of([r.ttft_ms for r in direct if r.ok and r.ttft_ms is not None])
        if direct else None,
        direct_failed=sum(1 for result in direct if not result.ok),
        median_overhead_ms=median(overheads) if overheads else None,
    )


@dataclass(frozen=True, slots=True)
class BurstResult:
    size: int
    successes: int
    errors: Mapping[str, int]
    #: Every successful client got the same text.
    identical: bool
    #: ... and it is the simulator's answer for the prompt (None: unknown).
    exact: bool | None
    #: Upstream calls the burst caused (None: could not be observed).
    upstream_calls: int | None
    #: Where ``upstream_calls`` comes from.
    source: str
    ttft: Summary


async def run_burst(ctx: PhaseContext) -> BurstResult:
    config = ctx.config
    size = config.burst_size
    prompt = f"TTFT suite {ctx.nonce} burst: the same question from {size} users at once."
    job = ctx.job(GATEWAY, prompt, max_tokens=config.max_tokens)
    sim_log = ctx.sim_log
    before = None if sim_log is not None else await ctx.gateway_metrics()

    ctx.progress.start("2. burst (identical prompts)", size)
    async with asyncio.TaskGroup() as clients:
        tasks = [clients.create_task(job()) for _ in range(size)]
        for task in tasks:
            task.add_done_callback(lambda _: ctx.progress.advance())
    results = [task.result() for task in tasks]

    upstream_calls: int | None
    if sim_log is not None:
        upstream_calls, source = len(await sim_log.calls_for(prompt)), "simulator log"
    else:
        after = await ctx.gateway_metrics()
        if before is None or after is None:
            upstream_calls, source = None, "gateway metrics unavailable"
        else:
            leaders = (after - before).total("gateway_coalesce_total", role="leader")
            upstream_calls, source = round(leaders), "gateway_coalesce_total{role=leader}"
    ctx.progress.finish(f"upstream calls: {upstream_calls}")

    ok = [result for result in results if result.ok]
    texts = {result.text for result in ok}
    exact: bool | None = None
    if ctx.endpoints.sim_tokens is not None:
        count = min(config.max_tokens, ctx.endpoints.sim_tokens)
        expected = "".join(answer_tokens(chat_body(prompt)["messages"], count))
        exact = len(ok) == size and texts == {expected}
    return BurstResult(
        size=size,
        successes=len(ok),
        errors=_error_kinds(results),
        identical=len(ok) == size and len(texts) == 1,
        exact=exact,
        upstream_calls=upstream_calls,
        source=source,
        ttft=Summary.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
    )
