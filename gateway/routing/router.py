"""The router: which upstreams may answer a model, and in which order.

An ``Upstream`` is one ``[[upstream]]`` table come alive: its own transport
(pool, connections), provider, circuit breaker, admission limit and in-flight
count. ``Router.plan()`` runs in the request handler, before the 200 goes
out: an unknown model is a 404 there, and each candidate's request is built
there (a request a provider cannot express is a 400, not a failure shared by
a burst). ``Router.next_upstream()`` picks each attempt: lowest priority
first, the balancer within a priority, skipping open circuits; when every
candidate's circuit is open it tries them anyway (Envoy's panic mode: better
than refusing everything for a whole cooldown).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from gateway.admission import AdmissionQueue
from gateway.errors import ModelNotFound
from gateway.routing.balancer import LeastInFlight
from gateway.routing.breaker import CircuitBreaker, CircuitState
from gateway.routing.budget import RetryBudget
from gateway.routing.config import RetryConfig, RoutingConfig, UpstreamConfig
from gateway.upstream.base import Transport, UpstreamRequest
from gateway.upstream.providers.base import Provider

log = structlog.get_logger("gateway.routing")


class RoutingObserver(Protocol):
    """Where the router's counts go (gateway/metrics.py implements it)."""

    def failure(self, upstream: str, kind: str) -> None: ...

    def retry(self, upstream: str, reason: str) -> None: ...

    def fallback(self, upstream: str) -> None: ...

    def upstream_ttft(self, upstream: str, seconds: float) -> None: ...


class _NoObserver:
    def failure(self, upstream: str, kind: str) -> None: ...

    def retry(self, upstream: str, reason: str) -> None: ...

    def fallback(self, upstream: str) -> None: ...

    def upstream_ttft(self, upstream: str, seconds: float) -> None: ...


@dataclass(eq=False)
class Upstream:
    config: UpstreamConfig
    transport: Transport
    provider: Provider
    #: The path of the URL, e.g. "/v1".
    base_path: str
    #: The URL without credentials, for /readyz and the start-up line.
    public_url: str
    breaker: CircuitBreaker
    #: Bounds the streams open at once here (None: no limit of its own).
    admission: AdmissionQueue | None = None
    #: Attempts started here and not yet ended.
    in_flight: int = 0
    #: Until when a 429's Retry-After asks us to stay away.
    hold_until: float = 0.0
    on_status: Callable[[str], None] = field(default=lambda status: None)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def weight(self) -> float:
        return self.config.weight

    @property
    def priority(self) -> int:
        return self.config.priority

    def answered(self) -> None:
        """An attempt here got its answer: the circuit closes, and a 429's
        Retry-After hold is over (the upstream takes requests again)."""
        self.breaker.success()
        self.hold_until = 0.0

    @property
    def waiting(self) -> int:
        """Attempts waiting for a slot of its own admission queue: started
        here (in ``in_flight``, which balancing weighs) but not open yet."""
        admission = self.admission
        return 0 if admission is None else admission.depth

    def has_room(self) -> bool:
        admission = self.admission
        return admission is None or admission.inflight < admission.max_inflight


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """One request's candidates, each with its request already built
    (``requests[i]`` is ``candidates[i]``'s). Tuples, not a mapping: every
    stream holds its plan until the first token."""

    model: str
    candidates: tuple[Upstream, ...]
    requests: tuple[UpstreamRequest, ...]

    def request_for(self, upstream: Upstream) -> UpstreamRequest:
        return self.requests[self.candidates.index(upstream)]


class Router:
    def __init__(
        self,
        config: RoutingConfig,
        upstreams: Sequence[Upstream],
        *,
        observer: RoutingObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.upstreams = tuple(upstreams)
        self.observer: RoutingObserver = observer or _NoObserver()
        self.clock = clock
        self.budget = RetryBudget(
            ratio=config.retry.retry_budget_ratio, minimum=config.retry.retry_budget_min
        )
        self._balancer = LeastInFlight()

    @property
    def retry(self) -> RetryConfig:
        return self.config.retry

    def candidates(self, model: str) -> tuple[Upstream, ...]:
        return tuple(up for up in self.upstreams if up.config.serves(model))

    def plan(self, body: Mapping[str, Any], model: str) -> RoutePlan:
        """The candidates for ``model`` with their requests; raises
        ``ModelNotFound`` (404) or the provider's ``BadRequest`` (400)."""
        candidates = self.candidates(model)
        if not candidates:
            raise ModelNotFound(f"The model `{model}` does not exist or is not served here.")
        return RoutePlan(model, candidates, tuple(_request(upstream, body, model) for upstream in candidates))

    def next_upstream(
        self, candidates: Sequence[Upstream], tried: Sequence[Upstream]
    ) -> Upstream:
        """The next attempt's upstream: one whose circuit lets it through,
        untried ones first (a tried one again rather than an open circuit),
        then by priority, room and balancer."""
        now = self.clock()
        untried = [up for up in candidates if up not in tried]
        usable = [up for up in untried if up.breaker.available(now)]
        usable = usable or [up for up in candidates if up.breaker.available(now)]
        if not usable:
            # Panic: every circuit is open; the one that half-opens soonest goes.
            pool = untried or candidates
            return min(pool, key=lambda up: (up.breaker.open_until, up.priority))
        best = min(up.priority for up in usable)
        group = [up for up in usable if up.priority == best]
        with_room = [up for up in group if up.has_room()] or group
        return self._balancer.order(with_room)[0]

    def circuit_open(self, upstream: Upstream) -> bool:
        return upstream.breaker.state(self.clock()) is not CircuitState.CLOSED

    def in_cooldown(self, upstream: Upstream) -> bool:
        """Whether its circuit is open, not yet half-open: until its cooldown
        (or Retry-After) ends, no request goes there but in panic mode."""
        return upstream.breaker.state(self.clock()) is CircuitState.OPEN

    async def aclose(self) -> None:
        """Close every upstream's transport, each even if another fails."""
        results = await asyncio.gather(
            *(upstream.transport.aclose() for upstream in self.upstreams), return_exceptions=True
        )
        for upstream, result in zip(self.upstreams, results, strict=True):
            if isinstance(result, Exception):
                log.warning("an upstream's transport did not close cleanly",
                            upstream=upstream.name, error=repr(result))


def _request(upstream: Upstream, body: Mapping[str, Any], model: str) -> UpstreamRequest:
    """``body`` as ``upstream``'s provider sends it, under its own name for ``model``."""
    wanted = upstream.config.upstream_model(model)
    mapped = body if wanted == model else {**body, "model": wanted}
    return upstream.provider.build_request(
        mapped, base_path=upstream.base_path, api_key=upstream.config.api_key or None
    )
