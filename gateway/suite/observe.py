"""What the suite sees from beside the stream: the upstream's log, the gateway's metrics.

With the simulator at hand (``make ttft``), the truth about upstream calls and
cancellations is the simulator's request log (``/admin/requests`` on its
origin): one record per upstream request, with its arrival, first token, end
and outcome on ``time.monotonic()``, a clock the suite's process shares on
this machine. A deployed gateway (``--target``) has no simulator beside it, so
the suite reads the gateway's own Prometheus metrics before and after a phase
and works with the differences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim.content import prompt_digest


def origin_of(url: str) -> str:
    """``https://host:port`` of a base URL such as ``https://host:port/v1``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def prompt_sha(prompt: str) -> str:
    """The simulator's ``prompt_sha`` of a one-message user prompt."""
    return prompt_digest([{"role": "user", "content": prompt}]).hex()


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """The part of a simulator log record the suite uses."""

    prompt_sha: str
    arrival: float
    first_token: float | None
    end: float | None
    outcome: str
    tokens_sent: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UpstreamRecord:
        return cls(
            prompt_sha=str(data.get("prompt_sha", "")),
            arrival=float(data["arrival"]),
            first_token=data.get("first_token"),
            end=data.get("end"),
            outcome=str(data.get("outcome", "")),
            tokens_sent=int(data.get("tokens_sent", 0)),
        )


class SimLog:
    """The simulator's request log, over its admin endpoints."""

    def __init__(self, session: aiohttp.ClientSession, sim_url: str) -> None:
        self._session = session
        self._admin = origin_of(sim_url) + "/admin/requests"

    async def records(self) -> list[UpstreamRecord]:
        async with self._session.get(self._admin) as response:
            response.raise_for_status()
            body = await response.json()
        return [UpstreamRecord.from_json(item) for item in body["requests"]]

    async def clear(self) -> None:
        async with self._session.delete(self._admin) as response:
            response.raise_for_status()
            await response.read()

    async def wait_ended(self, count: int, *, timeout_s: float) -> bool:
        """Until ``count`` records have ended (the simulator's long-poll);
        False when they had not within ``timeout_s``."""
        query = {"count": str(count), "timeout_ms": str(max(1, round(timeout_s * 1000)))}
        async with self._session.get(self._admin + "/wait", params=query) as response:
            await response.read()
            if response.status == 408:
                return False
            response.raise_for_status()
            return True

    async def calls_for(self, prompt: str) -> list[UpstreamRecord]:
        """The upstream requests made for ``prompt``."""
        sha = prompt_sha(prompt)
        return [record for record in await self.records() if record.prompt_sha == sha]


SampleKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Samples of one ``/metrics`` scrape, or the difference of two."""

    samples: Mapping[SampleKey, float]

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        samples: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return cls(samples)

    def __sub__(self, earlier: MetricsSnapshot) -> MetricsSnapshot:
        return MetricsSnapshot(
            {key: value - earlier.samples.get(key, 0.0) for key, value in self.samples.items()}
        )

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample_name, sample_labels), value in self.samples.items()
            if sample_name == name and wanted <= sample_labels
        )

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` of ``histogram``, summed over its label
        sets, sorted by bound (``+Inf`` last)."""
        sums: dict[float, float] = {}
        for (name, labels), value in self.samples.items():
            if name != histogram + "_bucket":
                continue
            bound = _bound(labels)
            sums[bound] = sums.get(bound, 0.0) + value
        return sorted(sums.items())


def _bound(labels: Iterable[tuple[str, str]]) -> float:
    for name, value in labels:
        if name == "le":
            return math.inf if value in ("+Inf", "Inf") else float(value)
    raise ValueError("a histogram bucket without an 'le' label")


async def scrape(session: aiohttp.ClientSession, base_url: str, *, api_key: str | None) -> MetricsSnapshot:
    """``GET /metrics`` on the origin of ``base_url``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with session.get(origin_of(base_url) + "/metrics", headers=headers) as response:
        response.raise_for_status()
        return MetricsSnapshot.parse(await response.text())


async def try_scrape(
    session: aiohttp.ClientSession, base_url: str, *, api_key: str | None
) -> MetricsSnapshot | None:
    """``scrape``, or None where ``/metrics`` is not reachable (a deployment
    may well keep it off the public origin)."""
    try:
        return await scrape(session, base_url, api_key=api_key)
    except (aiohttp.ClientError, ValueError):
        return None
