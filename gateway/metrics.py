"""Prometheus collectors (every name: docs/http-api.md, "Metrics") and rolling windows.

One ``CollectorRegistry`` per app, passed in: two apps in one process (tests)
never share a series. Label children are bound once here, never looked up per
chunk. Gauges that mirror live state (actors, streams, queue depth,
connections) are read at scrape time by a custom collector, so they cannot
drift from the truth and fall back to 0 by themselves when the gateway idles.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from prometheus_async import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import QueueFull, QueueTimeout

#: TTFT buckets: fine below 2 s (the go/no-go line is 1.5 s), reaching 60 s
#: because long reasoning models take that long (envoyproxy/ai-gateway #1793).
TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CANCEL_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 1.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

APIS = ("openai", "native", "anthropic")
ROLES = ("leader", "follower")
#: How a request ended. Only "error" and "shed" count against the error ratio;
#: "cancelled" (the client left) and "rejected" (its request was invalid) do
#: not enter the window at all.
OUTCOMES = ("ok", "error", "shed", "cancelled", "rejected")
SERVED = frozenset({"ok", "error", "shed"})

T = TypeVar("T")
FAILED = frozenset({"error", "shed"})


def outcome_of(status: int, code: str) -> str:
    """How a request that ended with an error counts: our own load shedding
    (a full or slow queue, a drain) is "shed"; the client's mistakes are
    "rejected" and stay out of the error ratio; the rest is an "error"."""
    if code.startswith("queue_") or code == "shutting_down":
        return "shed"
    if status < 500 and status != 429:
        return "rejected"
    return "error"


@dataclass(frozen=True, slots=True)
class LiveState:
    """What the scrape-time collector reads, as plain callables."""

    active_streams: Callable[[], int]
    active_actors: Callable[[], int]
    queue_depth: Callable[[], int]
    upstream_connections: Callable[[], int]
    coalesce_leaders: Callable[[], int]
    coalesce_followers: Callable[[], int]
    upstream_resets: Callable[[], int]


class RollingWindows:
    """The last 100 outcomes and recent latency samples, for /stats and the
    error-ratio gauge (bounded deques: constant memory)."""

    def __init__(self, outcomes: int = 100, samples: int = 1000) -> None:
        self.outcomes: deque[str] = deque(maxlen=outcomes)
        self.ttft_s: deque[float] = deque(maxlen=samples)
        self.queue_wait_s: deque[float] = deque(maxlen=samples)

    def error_ratio(self) -> float:
        if not self.outcomes:
            return 0.0
        return sum(1 for o in self.outcomes if o in FAILED) / len(self.outcomes)


def percentile(samples: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no samples."""
    ordered = sorted(samples)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.windows = RollingWindows()
        requests = Counter(
            "gateway_requests", "Requests by API and outcome", ("api", "outcome"), registry=registry
        )
        self.requests = {(a, o): requests.labels(a, o) for a in APIS for o in OUTCOMES}
        ttft = Histogram(
            "gateway_ttft_seconds",
            "Arrival to the first content byte written to the client",
            ("api", "role"),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.ttft = {(a, r): ttft.labels(a, r) for a in APIS for r in ROLES}
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Arrival to admission (0 for followers)",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Arrival to the end of the response",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.cancel = Histogram(
            "gateway_cancel_seconds",
            "Last subscriber gone to RST_STREAM written",
            buckets=CANCEL_BUCKETS,
            registry=registry,
        )
        upstream = Counter(
            "gateway_upstream_requests",
            "Upstream responses by upstream and status ('error' when none came)",
            ("upstream", "status"),
            registry=registry,
        )
        self._upstream = upstream
        self.stream_failures = Counter(
            "gateway_stream_failures",
            "Streams that failed upstream, once each whatever their subscribers, by cause "
            "(the error code), after any retry and however far they got",
            ("cause",),
            registry=registry,
        )
        self.upstream_open = Histogram(
            "gateway_upstream_open_seconds",
            "Admission to the upstream request on the wire (connection, TLS, stream)",
            buckets=CANCEL_BUCKETS + (3.0, 10.0),
            registry=registry,
        )
        self.upstream_open_failures = Counter(
            "gateway_upstream_open_failures",
            "Upstream requests that could not be sent (connect, TLS, refused stream)",
            registry=registry,
        )
        self.upstream_opening = Gauge(
            "gateway_upstream_opening",
            "Upstream requests being sent right now",
            registry=registry,
        )
        # Children bound once per upstream and status seen (statuses are few:
        # HTTP codes and "error"), not looked up on every request.
        self._upstream_by_status: dict[tuple[str, str], Counter] = {}
        self._init_routing(registry)

    def timed_open(self, open_source: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """``open_source`` timed and its calls in progress tracked, by
        prometheus-async, and its failures counted. Only ``Exception``s count
        as failures: a cancelled open (the last client left) is none."""

        def opened() -> Awaitable[T]:
            return aio.time(
                self.upstream_open,
                self._count_open_failure(
                    aio.track_inprogress(self.upstream_opening, open_source()),
                ),
            )

        return opened

    async def _count_open_failure(self, opening: Awaitable[T]) -> T:
        try:
            return await opening
        except (QueueFull, QueueTimeout):
            # A routed upstream's own admission limit (max_inflight): no
            # request was tried upstream, so none failed to be sent.
            raise
        except Exception:
            self.upstream_open_failures.inc()
            raise

    def bind_live_state(self, live: LiveState) -> None:
        self.registry.register(_LiveCollector(live, self.windows))

    def upstream_status(self, status: str, upstream: str = "default") -> None:
        child = self._upstream_by_status.get((upstream, status))
        if child is None:
            child = self._upstream_by_status[upstream, status] = self._upstream.labels(
                upstream, status
            )
        child.inc()

    # -- routing (several upstreams): gateway.routing.router.RoutingObserver ----------

    def _init_routing(self, registry: CollectorRegistry) -> None:
        self._retries = Counter(
            "gateway_upstream_retries",
            "Attempts retried before the first token, by the upstream that failed and why",
            ("upstream", "reason"),
            registry=registry,
        )
        self._failures = Counter(
            "gateway_upstream_failures",
            "Failed upstream attempts by upstream and kind",
            ("upstream", "kind"),
            registry=registry,
        )
        self._fallbacks = Counter(
            "gateway_upstream_fallbacks",
            "Attempts that moved to this upstream after another one failed",
            ("upstream",),
            registry=registry,
        )
        self._upstream_ttft = Histogram(
            "gateway_upstream_ttft_seconds",
            "An attempt's start to its first content delta, by upstream",
            ("upstream",),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )

    def failure(self, upstream: str, kind: str) -> None:
        self._failures.labels(upstream, kind).inc()

    def retry(self, upstream: str, reason: str) -> None:
        self._retries.labels(upstream, reason).inc()

    def fallback(self, upstream: str) -> None:
        self._fallbacks.labels(upstream).inc()

    def upstream_ttft(self, upstream: str, seconds: float) -> None:
        self._upstream_ttft.labels(upstream).observe(seconds)

    def bind_upstreams(self, upstreams: Callable[[], Iterable[UpstreamGauges]]) -> None:
        """Per-upstream gauges read at scrape time (circuit state, in flight)."""
        self.registry.register(_UpstreamCollector(upstreams))

    def finished(self, api: str, outcome: str, duration_s: float) -> None:
        self.requests[(api, outcome)].inc()
        self.duration.observe(duration_s)
        if outcome in SERVED:
            self.windows.outcomes.append(outcome)

    def first_token(self, api: str, role: str, ttft_s: float) -> None:
        self.ttft[(api, role)].observe(ttft_s)
        self.windows.ttft_s.append(ttft_s)

    def admitted(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s)
        self.windows.queue_wait_s.append(queue_wait_s)


@dataclass(frozen=True, slots=True)
class UpstreamGauges:
    name: str
    circuit_open: bool
    in_flight: int
    connections: int


class _UpstreamCollector(Collector):
    def __init__(self, upstreams: Callable[[], Iterable[UpstreamGauges]]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterator[Metric]:
        circuit = GaugeMetricFamily(
            "gateway_upstream_circuit_open",
            "1 while the upstream's circuit is open or half-open (skipped)",
            labels=("upstream",),
        )
        in_flight = GaugeMetricFamily(
            "gateway_upstream_in_flight", "Attempts open on the upstream", labels=("upstream",)
        )
        connections = GaugeMetricFamily(
            "gateway_upstream_pool_connections",
            "Open connections of the upstream's own pool",
            labels=("upstream",),
        )
        for upstream in self._upstreams():
            circuit.add_metric((upstream.name,), 1.0 if upstream.circuit_open else 0.0)
            in_flight.add_metric((upstream.name,), upstream.in_flight)
            connections.add_metric((upstream.name,), upstream.connections)
        yield circuit
        yield in_flight
        yield connections


class _LiveCollector(Collector):
    def __init__(self, live: LiveState, windows: RollingWindows) -> None:
        self._live = live
        self._windows = windows

    def collect(self) -> Iterator[Metric]:
        live = self._live
        for name, doc, read in (
            ("gateway_active_streams", "Streaming responses open", live.active_streams),
            ("gateway_active_actors", "Stream actors running", live.active_actors),
            ("gateway_queue_depth", "Requests waiting for admission", live.queue_depth),
            ("gateway_upstream_connections", "Open upstream connections", live.upstream_connections),
        ):
            yield GaugeMetricFamily(name, doc, value=read())
        yield GaugeMetricFamily(
            "gateway_error_ratio_last_100",
            "Failed share of the last 100 served requests",
            value=self._windows.error_ratio(),
        )
        coalesce = CounterMetricFamily(
            "gateway_coalesce", "Subscriptions by role", labels=("role",)
        )
        coalesce.add_metric(("leader",), live.coalesce_leaders())
        coalesce.add_metric(("follower",), live.coalesce_followers())
        yield coalesce
        yield CounterMetricFamily(
            "gateway_upstream_resets", "Upstream streams reset once nobody read them",
            value=live.upstream_resets(),
        )
