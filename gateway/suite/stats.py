"""Summaries of latency samples, as the LLM benchmarks report them.

Percentiles use linear interpolation between closest ranks (numpy's default,
which vLLM ``bench serve`` and GuideLLM report): with few samples a p95 is
between the two largest, rather than jumping to the maximum.

Histogram quantiles (for a deployed gateway, whose cancel latency we only see
as ``gateway_cancel_seconds`` buckets) follow Prometheus' ``histogram_quantile``:
linear interpolation inside the bucket the rank falls in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``samples``; None when empty.
    A sample may be ``inf`` (a cancel that never arrived): a rank that
    touches it is ``inf``, never NaN."""
    if not samples:
        return None
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    below, above = ordered[low], ordered[high]
    if position == low or below == above:
        return below
    return below + (above - below) * (position - low)


def mean(samples: Sequence[float]) -> float | None:
    return sum(samples) / len(samples) if samples else None


@dataclass(frozen=True, slots=True)
class Summary:
    """One latency distribution in milliseconds (None: no samples)."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Summary:
        return cls(
            count=len(samples_ms),
            mean=mean(samples_ms),
            p50=percentile(samples_ms, 50),
            p95=percentile(samples_ms, 95),
            p99=percentile(samples_ms, 99),
            max=max(samples_ms) if samples_ms else None,
        )


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)``
    buckets sorted by ``le`` (the last one ``+Inf``); None without
    observations. A rank in the ``+Inf`` bucket answers the highest finite
    bound, as Prometheus does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q / 100 * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            in_bucket = count - previous_count
            if in_bucket <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / in_bucket
        previous_bound, previous_count = bound, count
    return previous_bound


def histogram_max_bound(buckets: Sequence[tuple[float, float]]) -> float | None:
    """The upper bound of the highest non-empty bucket: what a histogram can
    say about the maximum (the highest finite bound if ``+Inf`` holds some)."""
    previous_count = 0.0
    highest: float | None = None
    finite_bound: float | None = None
    for bound, count in buckets:
        if not math.isinf(bound):
            finite_bound = bound
        if count > previous_count:
            highest = finite_bound
        previous_count = count
    return highest
