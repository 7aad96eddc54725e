"""Phase 3: cancellation, measured from the far side.

Clients abort in the two places that matter: mid-stream (after a few
tokens) and before the first token (while the model still "thinks", the
case a gateway notices only if it watches the socket rather than waiting for
its next write). Cancel latency is how long the upstream request outlives the
client: the simulator's recorded end of that request (``end`` in its log, a
reset or disconnect) minus the client's abort, both on ``time.monotonic()``,
which is one clock for every process on this machine.

An upstream request that has not ended ``cancel_wait_s`` after its client left
(a gateway that does not propagate cancellation reads the stream to its end)
is a cancel that never arrived: its latency is infinite, and one of them fails
the cancel line whatever the p95 of the others. An abort whose request the
simulator never saw cannot be timed; it is counted (``unmatched``) and fails
the line too, rather than dropping out of the figures.

Against a deployed gateway there is no simulator log: the latency comes from
the gateway's ``gateway_cancel_seconds`` histogram (last subscriber gone to
RST_STREAM written), the difference of two scrapes around the phase.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.suite.client import Abort, StreamResult
from gateway.suite.loadgen import Job, LoadShape, drive
from gateway.suite.observe import MetricsSnapshot, SimLog, prompt_sha
from gateway.suite.phases import GATEWAY, PhaseContext
from gateway.suite.stats import Summary, histogram_max_bound, histogram_quantile

#: Mid-stream cancels leave after this many content deltas ...
MID_STREAM_AFTER_TOKENS = 3
#: ... of an answer long enough to still be running then.
MID_STREAM_DIRECTIVE = "[sim tokens=400]"
#: Pre-token cancels leave this long after the first byte (the gateway's
#: ``: ping``), well inside a first token this slow.
BEFORE_TOKEN_AFTER_S = 0.1
BEFORE_TOKEN_DIRECTIVE = "[sim ttft_ms=2000]"
#: Cancels start as a Poisson process at this rate: staggered, so each is
#: measured on its own rather than as one storm.
CANCELS_PER_S = 40.0
#: How often a deployed gateway's metrics are re-read while cancels settle.
_SCRAPE_INTERVAL_S = 0.05

MID_STREAM, BEFORE_TOKEN = "mid-stream", "before first token"


@dataclass(frozen=True, slots=True)
class CancelRun:
    attempted: int
    #: Client aborts that happened (a stream may end or fail before its abort point).
    aborted: int
    #: Aborts whose upstream end was seen.
    observed: int
    #: Aborts whose upstream request had not ended ``cancel_wait_s`` later
    #: (counted with an infinite latency).
    unresolved: int
    #: Aborts with no upstream request to time (not in the simulator's log).
    unmatched: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    #: Per kind (None against a deployed gateway: a histogram has no kinds).
    by_kind: Mapping[str, Summary] | None
    #: How the upstream requests ended (the simulator's outcomes).
    outcomes: Mapping[str, int]
    source: str


def _jobs(ctx: PhaseContext) -> list[tuple[str, str, Job[StreamResult]]]:
    """``(kind, prompt, job)``, the two kinds alternating."""
    planned = []
    for index in range(ctx.config.cancels):
        for kind, directive, abort in (
            (MID_STREAM, MID_STREAM_DIRECTIVE, Abort(after_tokens=MID_STREAM_AFTER_TOKENS)),
            (BEFORE_TOKEN, BEFORE_TOKEN_DIRECTIVE, Abort(after_first_byte_s=BEFORE_TOKEN_AFTER_S)),
        ):
            prompt = f"TTFT suite {ctx.nonce} cancel {index} {kind}: a long answer. {directive}"
            planned.append((kind, prompt, ctx.job(GATEWAY, prompt, max_tokens=None, abort=abort)))
    return planned


async def run_cancel(ctx: PhaseContext) -> CancelRun:
    planned = _jobs(ctx)
    sim_log = ctx.sim_log
    if sim_log is not None:
        # Only this phase's records from here on: "all ended" is a count.
        await sim_log.clear()
        before = None
    else:
        before = await ctx.gateway_metrics()
    shape = LoadShape(concurrency=len(planned), rate=CANCELS_PER_S, seed=ctx.config.load.seed)
    ctx.progress.start("3. cancel", len(planned))
    results = await drive([job for _, _, job in planned], shape, on_done=lambda _: ctx.progress.advance())
    if sim_log is not None:
        run = await _from_simulator(ctx, sim_log, planned, results)
    else:
        run = await _from_metrics(ctx, before, results)
    ctx.progress.finish()
    return run


async def _from_simulator(
    ctx: PhaseContext,
    sim_log: SimLog,
    planned: Sequence[tuple[str, str, Job[StreamResult]]],
    results: Sequence[StreamResult],
) -> CancelRun:
    await sim_log.wait_ended(len(results), timeout_s=ctx.config.cancel_wait_s)
    records = {record.prompt_sha: record for record in await sim_log.records()}
    latencies: dict[str, list[float]] = {MID_STREAM: [], BEFORE_TOKEN: []}
    outcomes: Counter[str] = Counter()
    aborted = unresolved = unmatched = 0
    for (kind, prompt, _), result in zip(planned, results, strict=True):
        if result.aborted_at is None:
            continue  # the stream ended or failed before its abort point
        aborted += 1
        record = records.get(prompt_sha(prompt))
        if record is None:
            unmatched += 1
            continue
        outcomes[record.outcome] += 1
        if record.end is None:
            unresolved += 1
            latencies[kind].append(math.inf)
        else:
            # An upstream that ended on its own a moment before the abort
            # reached it is not slow: clamp at 0.
            latencies[kind].append(max(0.0, record.end - result.aborted_at) * 1000)
    every = latencies[MID_STREAM] + latencies[BEFORE_TOKEN]
    overall = Summary.of(every)
    return CancelRun(
        attempted=len(results),
        aborted=aborted,
        observed=len(every) - unresolved,
        unresolved=unresolved,
        unmatched=unmatched,
        p50_ms=overall.p50,
        p95_ms=overall.p95,
        max_ms=overall.max,
        by_kind={kind: Summary.of(values) for kind, values in latencies.items()},
        outcomes=dict(outcomes),
        source="simulator log (upstream end - client abort)",
    )


async def _from_metrics(
    ctx: PhaseContext, before: MetricsSnapshot | None, results: Sequence[StreamResult]
) -> CancelRun:
    aborted = sum(1 for result in results if result.aborted_at is not None)
    delta: MetricsSnapshot | None = None
    if before is not None:
        # The gateway observes a cancel in the tick it notices the client
        # gone; give the last ones a moment to land before reading.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.config.cancel_wait_s
        while True:
            after = await ctx.gateway_metrics()
            delta = None if after is None else after - before
            seen = 0.0 if delta is None else delta.total("gateway_cancel_seconds_count")
            if seen >= aborted or loop.time() >= deadline:
                break
            await asyncio.sleep(_SCRAPE_INTERVAL_S)  # polling: a remote metric has no push
    if delta is None:
        return CancelRun(
            attempted=len(results), aborted=aborted, observed=0, unresolved=0, unmatched=0,
            p50_ms=None, p95_ms=None, max_ms=None, by_kind=None, outcomes={},
            source="gateway metrics unavailable",
        )
    buckets = delta.buckets("gateway_cancel_seconds")
    observed = round(delta.total("gateway_cancel_seconds_count"))

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    return CancelRun(
        attempted=len(results),
        aborted=aborted,
        observed=observed,
        unresolved=max(0, aborted - observed),
        unmatched=0,
        p50_ms=ms(histogram_quantile(50, buckets)),
        p95_ms=ms(histogram_quantile(95, buckets)),
        max_ms=ms(histogram_max_bound(buckets)),
        by_kind=None,
        outcomes={},
        source="gateway_cancel_seconds (histogram)",
    )
