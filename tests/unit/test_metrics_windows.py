"""gateway.metrics without a server: rolling windows, percentiles, buckets,
and the scrape-time collector reading live state."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    QUEUE_BUCKETS,
    TTFT_BUCKETS,
    GatewayMetrics,
    LiveState,
    RollingWindows,
    percentile,
)


def sample_values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def live(values: dict[str, int]) -> LiveState:
    def read(name: str):
        return lambda: values[name]

    return LiveState(**{name: read(name) for name in values})


LIVE_FIELDS = ("active_streams", "active_actors", "queue_depth", "upstream_connections",
               "coalesce_leaders", "coalesce_followers", "upstream_resets")


def test_nearest_rank_percentiles():
    assert percentile([], 95) is None
    assert percentile([7.0], 50) == percentile([7.0], 95) == 7.0
    hundred = [float(n) for n in range(100, 0, -1)]  # order of arrival does not matter
    assert percentile(hundred, 50) == 50.0
    assert percentile(hundred, 95) == 95.0
    assert percentile(hundred, 100) == 100.0
    assert percentile([1.0, 2.0, 3.0], 95) == 3.0


def test_error_ratio_counts_failures_among_served_requests_only():
    metrics = GatewayMetrics(CollectorRegistry())
    assert metrics.windows.error_ratio() == 0.0  # empty window: no evidence of failure
    for _ in range(97):
        metrics.finished("openai", "ok", 0.1)
    metrics.finished("openai", "error", 0.1)
    metrics.finished("native", "shed", 0.1)
    for _ in range(5):  # neither a client leaving nor a bad request is a failure
        metrics.finished("openai", "cancelled", 0.1)
        metrics.finished("native", "rejected", 0.1)
    assert len(metrics.windows.outcomes) == 99
    assert metrics.windows.error_ratio() == pytest.approx(2 / 99)


def test_the_window_holds_the_last_hundred_outcomes():
    windows = RollingWindows()
    windows.outcomes.extend(["error"] * 10)
    windows.outcomes.extend(["ok"] * 95)  # pushes out five of the failures
    assert len(windows.outcomes) == 100
    assert windows.error_ratio() == pytest.approx(0.05)
    windows.outcomes.extend(["ok"] * 5)
    assert windows.error_ratio() == 0.0


def test_latency_windows_are_bounded():
    metrics = GatewayMetrics(CollectorRegistry())
    for n in range(1500):
        metrics.first_token("openai", "leader", n / 1000)
        metrics.admitted(n / 1000)
    assert len(metrics.windows.ttft_s) == len(metrics.windows.queue_wait_s) == 1000
    assert min(metrics.windows.ttft_s) == 0.5  # the oldest 500 are gone


def test_buckets_resolve_the_go_no_go_lines():
    # histogram_quantile interpolates inside a bucket: with the thresholds
    # as bucket bounds, "p95 > 1.5 s" and "p95 > 1 s" are decided exactly.
    assert 1.5 in TTFT_BUCKETS and 1.0 in QUEUE_BUCKETS
    assert TTFT_BUCKETS[-1] == 60.0
    assert sum(1 for bound in TTFT_BUCKETS if bound <= 2.0) >= 12
    assert list(TTFT_BUCKETS) == sorted(TTFT_BUCKETS)


def test_observations_land_in_the_labelled_series():
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.first_token("native", "follower", 0.2)
    metrics.admitted(0.0)
    metrics.finished("native", "ok", 1.0)
    metrics.upstream_status("200")
    metrics.upstream_status("503")
    metrics.cancel.observe(0.0004)
    values = sample_values(registry)
    assert values[("gateway_ttft_seconds_count", (("api", "native"), ("role", "follower")))] == 1
    assert values[("gateway_ttft_seconds_bucket",
                   (("api", "native"), ("le", "0.2"), ("role", "follower")))] == 1
    assert values[("gateway_ttft_seconds_bucket",
                   (("api", "native"), ("le", "0.15"), ("role", "follower")))] == 0
    assert values[("gateway_queue_wait_seconds_count", ())] == 1
    assert values[("gateway_requests_total", (("api", "native"), ("outcome", "ok")))] == 1
    assert values[("gateway_upstream_requests_total", (("status", "503"), ("upstream", "default")))] == 1
    assert values[("gateway_cancel_seconds_bucket", (("le", "0.0005"),))] == 1


def test_live_gauges_are_read_at_scrape_time():
    state = dict.fromkeys(LIVE_FIELDS, 0)
    registry = CollectorRegistry(auto_describe=True)
    metrics = GatewayMetrics(registry)
    metrics.bind_live_state(live(state))
    state.update(active_streams=3, active_actors=1, queue_depth=2, upstream_connections=4,
                 coalesce_leaders=1, coalesce_followers=9, upstream_resets=5)
    metrics.finished("openai", "error", 0.1)
    busy = sample_values(registry)
    assert busy[("gateway_active_streams", ())] == 3
    assert busy[("gateway_queue_depth", ())] == 2
    assert busy[("gateway_upstream_connections", ())] == 4
    assert busy[("gateway_coalesce_total", (("role", "follower"),))] == 9
    assert busy[("gateway_upstream_resets_total", ())] == 5
    assert busy[("gateway_error_ratio_last_100", ())] == 1.0
    state.update(active_streams=0, active_actors=0, queue_depth=0)
    idle = sample_values(registry)
    assert idle[("gateway_active_streams", ())] == idle[("gateway_queue_depth", ())] == 0


def test_two_apps_in_one_process_keep_separate_series():
    first, second = GatewayMetrics(CollectorRegistry()), GatewayMetrics(CollectorRegistry())
    first.finished("openai", "ok", 0.1)
    assert sample_values(first.registry)[
        ("gateway_requests_total", (("api", "openai"), ("outcome", "ok")))] == 1
    assert sample_values(second.registry)[
        ("gateway_requests_total", (("api", "openai"), ("outcome", "ok")))] == 0
