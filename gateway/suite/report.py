"""The suite's output: a human table, ``ttft-report.json``, and the go/no-go lines.

The JSON uses vLLM ``bench serve``'s key style (``p95_ttft_ms``,
``median_itl_ms``, ``completed``, ``failed``, ``request_throughput`` ...), so
the tooling that reads those reads this. The go/no-go lines are the last three
lines of the output, always in this order and always all three, each ending in
PASS, FAIL or SKIP (a phase left out with ``--phases``), just after the burst
line, a gate as well:

    Burst: 50 identical requests, 1 upstream call, 50 answered PASS
    TTFT (streaming) p95: 412 ms (<= 1500) PASS
    Cancel latency p95: 2.1 ms (< 300) PASS
    Queue wait p95 (TTFT run): 0.0 ms (~ 0) PASS

A FAIL whose figure alone would not explain it says why after the verdict.
The run passes only when every line says PASS: a SKIP is a gate that was not
measured, so a run with a phase left out is no sign-off (exit status 1).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.suite.cancel import CancelRun
from gateway.suite.config import QUEUE_WAIT_TOLERANCE_MS, SuiteConfig
from gateway.suite.phases import BurstResult, TtftRun
from gateway.suite.stats import Summary, difference

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

#: The burst gate: followers per leader at least this, the shipped alert
#: rule's "under burst, followers/leaders < 10".
MIN_FOLLOWERS_PER_LEADER = 10


@dataclass(frozen=True, slots=True)
class SuiteReport:
    config: SuiteConfig
    #: What was measured: the target URL, or a description of the local system.
    system: str
    ttft: TtftRun | None
    burst: BurstResult | None
    cancel: CancelRun | None


@dataclass(frozen=True, slots=True)
class Verdict:
    key: str
    line: str
    status: str


def _ms(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return "∞ ms" if math.isinf(value) else f"{value:.{digits}f} ms"


def _burst_verdict(burst: BurstResult | None) -> Verdict:
    """PASS when every client got the same answer (the simulator's exact
    one, when it can be checked) and coalescing held: one upstream call, or
    at least ``MIN_FOLLOWERS_PER_LEADER`` followers per upstream call."""
    if burst is None:
        return Verdict("burst", f"Burst: skipped {SKIP}", SKIP)
    calls = burst.upstream_calls
    calls_text = "upstream calls unknown" if calls is None else (
        f"{calls} upstream call{'' if calls == 1 else 's'}"
    )
    line = f"Burst: {burst.size} identical requests, {calls_text}, {burst.successes} answered"
    why = []
    if burst.successes < burst.size:
        why.append(f"{burst.size - burst.successes} failed")
    elif not burst.identical:
        why.append("the answers differ")
    elif burst.exact is False:
        why.append("not the upstream's answer")
    if calls is None:
        why.append(burst.source)
    elif calls != 1 and (calls == 0 or (burst.size - calls) / calls < MIN_FOLLOWERS_PER_LEADER):
        why.append(f"fewer than {MIN_FOLLOWERS_PER_LEADER} followers per upstream call")
    if why:
        return Verdict("burst", f"{line} {FAIL} ({'; '.join(why)})", FAIL)
    return Verdict("burst", f"{line} {PASS}", PASS)


def verdicts(report: SuiteReport) -> list[Verdict]:
    """The burst gate, then the three go/no-go verdicts, in their fixed order."""
    gates = report.config.thresholds
    out: list[Verdict] = [_burst_verdict(report.burst)]

    ttft = report.ttft
    bound = f"(<= {gates.ttft_p95_ms:g})"
    if ttft is None:
        out.append(Verdict("ttft", f"TTFT (streaming) p95: skipped {bound} {SKIP}", SKIP))
    else:
        p95 = ttft.ttft.p95
        too_many_errors = ttft.error_rate > gates.max_error_rate
        ok = p95 is not None and p95 <= gates.ttft_p95_ms and not too_many_errors
        why = f" ({ttft.failed} of {ttft.requests} requests failed)" if too_many_errors else ""
        status = PASS if ok else FAIL
        out.append(Verdict("ttft", f"TTFT (streaming) p95: {_ms(p95, 0)} {bound} {status}{why}", status))

    cancel = report.cancel
    bound = f"(< {gates.cancel_p95_ms:g})"
    if cancel is None:
        out.append(Verdict("cancel", f"Cancel latency p95: skipped {bound} {SKIP}", SKIP))
    else:
        p95 = cancel.p95_ms
        # A cancel that never reached the upstream is a failed cancel, even
        # when the others' p95 hides it; an abort with no upstream request
        # to time is not a pass either.
        ok = (
            p95 is not None and p95 < gates.cancel_p95_ms
            and cancel.unresolved == 0 and cancel.unmatched == 0
        )
        reasons = []
        if cancel.unresolved:
            reasons.append(f"{cancel.unresolved} of {cancel.aborted} cancels never reached the upstream")
        if cancel.unmatched:
            reasons.append(f"{cancel.unmatched} of {cancel.aborted} aborts had no upstream request")
        if cancel.aborted == 0:
            reasons.append("no client abort took place")
        why = f" ({'; '.join(reasons)})" if reasons else ""
        status = PASS if ok else FAIL
        out.append(Verdict("cancel", f"Cancel latency p95: {_ms(p95, 1)} {bound} {status}{why}", status))

    tolerance = gates.queue_wait_p95_ms
    bound = "(~ 0)" if tolerance == QUEUE_WAIT_TOLERANCE_MS else f"(<= {tolerance:g})"
    if ttft is None:
        out.append(Verdict("queue_wait", f"Queue wait p95 (TTFT run): skipped {bound} {SKIP}", SKIP))
    else:
        p95 = ttft.queue_wait.p95
        status = PASS if p95 is not None and p95 <= tolerance else FAIL
        why = " (no meta records from the gateway)" if p95 is None else ""
        out.append(
            Verdict("queue_wait", f"Queue wait p95 (TTFT run): {_ms(p95, 1)} {bound} {status}{why}", status)
        )
    return out


def passed(report: SuiteReport) -> bool:
    """Every gate measured and passed: a SKIP is no pass."""
    return all(verdict.status == PASS for verdict in verdicts(report))


# -- JSON ---------------------------------------------------------------------------


def _round(value: float | None, digits: int = 2) -> float | None:
    """JSON has no infinity: an infinite figure (a cancel that never arrived)
    is null, and ``cancel_unresolved`` says why."""
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _summary_keys(metric: str, summary: Summary) -> dict[str, float | None]:
    return {
        f"mean_{metric}_ms": _round(summary.mean),
        f"median_{metric}_ms": _round(summary.p50),
        f"p95_{metric}_ms": _round(summary.p95),
        f"p99_{metric}_ms": _round(summary.p99),
        f"max_{metric}_ms": _round(summary.max),
    }


def to_json(report: SuiteReport) -> dict[str, Any]:
    config = report.config
    body: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": report.system,
        "load": config.load.describe(),
        "max_concurrency": config.load.concurrency,
        "request_rate": config.load.rate if config.load.rate is not None else "inf",
        "burstiness": config.load.burstiness,
        "seed": config.load.seed,
        "num_prompts": config.requests,
        "num_warmups": config.warmup_requests,
        "max_tokens": config.max_tokens,
    }
    if (ttft := report.ttft) is not None:
        body |= {
            "duration": _round(ttft.duration_s, 3),
            "completed": ttft.completed,
            "failed": ttft.failed,
            "error_rate": round(ttft.error_rate, 4),
            "errors": dict(ttft.errors),
            "total_output_tokens": ttft.output_tokens,
            "request_throughput": _round(ttft.requests / ttft.duration_s if ttft.duration_s else None),
            "output_throughput": _round(ttft.output_tokens / ttft.duration_s if ttft.duration_s else None),
            **_summary_keys("ttft", ttft.ttft),
            **_summary_keys("ttfb", ttft.ttfb),
            **_summary_keys("itl", ttft.itl),
            **_summary_keys("e2el", ttft.e2e),
            **_summary_keys("queue_wait", ttft.queue_wait),
            "median_overhead_ms": _round(ttft.median_overhead_ms),
            "p95_overhead_ms": _round(
                difference(ttft.ttft.p95, ttft.direct_ttft.p95) if ttft.direct_ttft else None
            ),
        }
        if ttft.direct_ttft is not None:
            body |= {f"baseline_{k}": v for k, v in _summary_keys("ttft", ttft.direct_ttft).items()}
            body["baseline_failed"] = ttft.direct_failed
    if (burst := report.burst) is not None:
        body |= {
            "burst_size": burst.size,
            "burst_successes": burst.successes,
            "burst_identical": burst.identical,
            "burst_exact_content": burst.exact,
            "burst_upstream_calls": burst.upstream_calls,
            "burst_upstream_calls_source": burst.source,
            "burst_errors": dict(burst.errors),
            "burst_p95_ttft_ms": _round(burst.ttft.p95),
        }
    if (cancel := report.cancel) is not None:
        body |= {
            "cancel_attempted": cancel.attempted,
            "cancel_aborted": cancel.aborted,
            "cancel_observed": cancel.observed,
            "cancel_unresolved": cancel.unresolved,
            "cancel_unmatched": cancel.unmatched,
            "p50_cancel_ms": _round(cancel.p50_ms, 3),
            "p95_cancel_ms": _round(cancel.p95_ms, 3),
            "max_cancel_ms": _round(cancel.max_ms, 3),
            "cancel_outcomes": dict(cancel.outcomes),
            "cancel_source": cancel.source,
        }
        if cancel.by_kind is not None:
            for kind, summary in cancel.by_kind.items():
                slug = kind.replace(" ", "_").replace("-", "_")
                body[f"p95_cancel_{slug}_ms"] = _round(summary.p95, 3)
    gates = config.thresholds
    body["thresholds"] = {
        "p95_ttft_ms": gates.ttft_p95_ms,
        "p95_cancel_ms": gates.cancel_p95_ms,
        "p95_queue_wait_ms": gates.queue_wait_p95_ms,
        "max_error_rate": gates.max_error_rate,
    }
    body["verdicts"] = {verdict.key: verdict.status for verdict in verdicts(report)}
    body["passed"] = passed(report)
    return body


# -- the human table ------------------------------------------------------------------


def _figures(summary: Summary, *, digits: int = 1) -> str:
    def one(name: str, value: float | None) -> str:
        return f"{name} {'n/a' if value is None else f'{value:.{digits}f}'}"

    return "  ".join(one(n, v) for n, v in (("p50", summary.p50), ("p95", summary.p95), ("p99", summary.p99)))


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"


def table(report: SuiteReport) -> str:
    rows: list[tuple[str, str, str]] = []
    if (ttft := report.ttft) is not None:
        direct = f" (+{ttft.requests} direct)" if ttft.direct_ttft is not None else ""
        rows += [
            ("1. TTFT run", "load", ttft.load),
            ("", "requests", f"{ttft.requests} via the gateway{direct} in {ttft.duration_s:.1f} s"),
            ("", "TTFT ms", _figures(ttft.ttft)),
        ]
        if ttft.direct_ttft is not None:
            rows.append(("", "TTFT direct ms", _figures(ttft.direct_ttft)))
            overhead = ttft.median_overhead_ms
            p95_overhead = difference(ttft.ttft.p95, ttft.direct_ttft.p95)
            rows.append((
                "", "gateway overhead",
                f"median {_ms(overhead, 2)} (paired, same prompts), at p95 {_ms(p95_overhead, 2)}",
            ))
        rows += [
            ("", "first byte ms", _figures(ttft.ttfb)),
            ("", "ITL ms", _figures(ttft.itl)),
            ("", "end-to-end ms", _figures(ttft.e2e, digits=0)),
            ("", "queue wait ms", _figures(ttft.queue_wait, digits=2) + "  (gateway meta records)"),
            ("", "errors", f"{ttft.failed}"),
        ]
    if (burst := report.burst) is not None:
        exact = {True: "yes", False: "NO", None: "not checked"}[burst.exact]
        rows += [
            ("2. burst", "requests", f"{burst.size} identical, {burst.successes} succeeded"),
            ("", "same answer", f"{'yes' if burst.identical else 'NO'}; exact content: {exact}"),
            ("", "upstream calls", f"{burst.upstream_calls} ({burst.source})"),
        ]
        if burst.errors:
            rows.append(("", "errors", _counts(burst.errors)))
    if (cancel := report.cancel) is not None:
        rows += [
            ("3. cancel", "aborts", f"{cancel.aborted} of {cancel.attempted} "
             f"(mid-stream and before the first token), {cancel.unresolved} not ended upstream, "
             f"{cancel.unmatched} with no upstream request"),
            ("", "latency ms", "  ".join(
                f"{name} {_ms(value, 2).removesuffix(' ms')}"
                for name, value in (("p50", cancel.p50_ms), ("p95", cancel.p95_ms), ("max", cancel.max_ms))
            )),
        ]
        for kind, summary in (cancel.by_kind or {}).items():
            rows.append(("", f"  {kind}", f"p50 {_ms(summary.p50, 2)}  max {_ms(summary.max, 2)}"))
        if cancel.outcomes:
            rows.append(("", "upstream ended", _counts(cancel.outcomes)))
        rows.append(("", "source", cancel.source))
    if ttft is not None:
        rows += [
            ("4. errors", "error rate", f"{ttft.error_rate:.2%} ({ttft.failed} of {ttft.requests})"),
            ("", "kinds", _counts(ttft.errors)),
        ]
    width_phase = max((len(r[0]) for r in rows), default=0)
    width_metric = max((len(r[1]) for r in rows), default=0)
    lines = [f"TTFT suite against {report.system}"]
    lines += [f"{p:<{width_phase}}  {m:<{width_metric}}  {v}" for p, m, v in rows]
    return "\n".join(lines)
