"""Reading the gateway's ``/metrics`` in tests, through prometheus_client's
own text parser (the format Prometheus scrapes, not a regex over it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.cluster.metrics import ClusterMetrics
from gateway.exchanges.metrics import ExchangeMetrics
from gateway.metrics import GatewayMetrics, LiveState, UpstreamGauges

#: The metric names dashboards and alert rules depend on (docs/http-api.md,
#: "Metrics"), as exposed (counters with ``_total``).
CONTRACT_METRICS = (
    "gateway_requests_total",
    "gateway_ttft_seconds",
    "gateway_queue_wait_seconds",
    "gateway_request_duration_seconds",
    "gateway_cancel_seconds",
    "gateway_coalesce_total",
    "gateway_active_streams",
    "gateway_active_actors",
    "gateway_queue_depth",
    "gateway_upstream_requests_total",
    "gateway_upstream_resets_total",
    "gateway_upstream_connections",
    "gateway_error_ratio_last_100",
)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One parsed exposition: family names with their types, and samples."""

    types: dict[str, str]
    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        types: dict[str, str] = {}
        samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            samples.extend(family.samples)
        return cls(types, tuple(samples))

    def exposed_names(self) -> set[str]:
        """Names as a PromQL expression refers to them: counters with
        ``_total``, histograms with their base name and ``_bucket``,
        ``_sum``, ``_count`` series."""
        names: set[str] = set()
        for name, kind in self.types.items():
            if kind == "counter":
                names.add(name + "_total")
            elif kind == "histogram":
                names.update({name, name + "_bucket", name + "_sum", name + "_count"})
            else:
                names.add(name)
        return names

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            sample
            for sample in self.samples
            if sample.name == name
            and all(sample.labels.get(label) == value for label, value in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``
        (0 when none: an unlabelled child not yet created)."""
        return sum(sample.value for sample in self.matching(name, **labels))

    def one(self, name: str, **labels: str) -> float:
        """The value of exactly one sample; fails on none or several."""
        found = self.matching(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0].value

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Scrape:
    async with http.get(base_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape.parse(await resp.text())


def missing(expected: Iterable[str], exposed: set[str]) -> list[str]:
    return [name for name in expected if name not in exposed]


def exposed_metric_names() -> set[str]:
    """What a gateway's /metrics offers to PromQL, from the collectors
    themselves (no server): for checking rules and dashboards against. The
    cluster's series are in (a process in cluster mode has them)."""
    metrics = GatewayMetrics(CollectorRegistry())
    ExchangeMetrics(metrics.registry)
    ClusterMetrics(metrics.registry)
    metrics.bind_live_state(
        LiveState(**{field.name: (lambda: 0) for field in dataclasses.fields(LiveState)})
    )
    metrics.bind_upstreams(lambda: [UpstreamGauges("default", False, 0, 0)])
    for name in ("failure", "retry"):
        getattr(metrics, name)("default", "connect")
    metrics.fallback("default")
    metrics.upstream_ttft("default", 0.1)
    return Scrape.parse(generate_latest(metrics.registry).decode()).exposed_names()
