"""The router's sans-IO parts, one rule at a time: circuit breaker, retry
budget, balancer, failure classification."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.admission import AdmissionQueue
from gateway.errors import (
    BadRequest,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamStreamRefused,
    UpstreamTimeout,
)
from gateway.routing.balancer import LeastInFlight
from gateway.routing.breaker import CircuitBreaker, CircuitState
from gateway.routing.budget import RetryBudget
from gateway.routing.config import RetryConfig, RoutingConfig, UpstreamConfig
from gateway.routing.failures import classify, parse_retry_after
from gateway.routing.router import Router, Upstream
from gateway.upstream.providers import OpenAIProvider

RETRY = RetryConfig().retry_statuses


def test_the_circuit_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=10)
    breaker.failure(0)
    breaker.failure(0)
    breaker.success()  # the count is of consecutive failures
    breaker.failure(1)
    breaker.failure(1)
    assert breaker.state(1) is CircuitState.CLOSED
    breaker.failure(2)
    assert breaker.state(2) is CircuitState.OPEN and not breaker.available(11.9)


def test_after_the_cooldown_one_probe_goes_and_its_outcome_decides() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=10)
    breaker.failure(0)
    assert breaker.state(10) is CircuitState.HALF_OPEN
    assert breaker.acquire(10)
    assert not breaker.acquire(10)  # one probe at a time
    breaker.failure(10.5)  # the probe failed: another full cooldown
    assert not breaker.available(20) and breaker.available(20.5)
    assert breaker.acquire(20.5)
    breaker.success()
    assert breaker.state(20.6) is CircuitState.CLOSED and breaker.available(20.6)


def test_a_probe_whose_client_left_lets_another_probe() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=1)
    breaker.failure(0)
    assert breaker.acquire(1)
    breaker.release(breaker.openings)
    assert breaker.acquire(1)


def test_a_retry_after_holds_the_circuit_open_that_long() -> None:
    breaker = CircuitBreaker(failures=5, cooldown_s=1)
    breaker.failure(0, hold_until=30)
    assert breaker.state(29) is CircuitState.OPEN
    assert breaker.state(30) is CircuitState.HALF_OPEN


def test_the_retry_budget_is_a_minimum_plus_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.5, minimum=2, window_s=10)
    assert [budget.try_retry(0) for _ in range(3)] == [True, True, False]
    for _ in range(4):
        budget.request(1)
    assert [budget.try_retry(1) for _ in range(3)] == [True, True, False]
    # Ten seconds later every bucket of those seconds has gone.
    assert [budget.try_retry(12) for _ in range(3)] == [True, True, False]


@dataclass
class Up:
    name: str
    weight: float = 1.0
    in_flight: int = 0


def test_least_in_flight_by_weight_and_round_robin_on_ties() -> None:
    balancer = LeastInFlight()
    a, b = Up("a"), Up("b", weight=2)
    picks = []
    for _ in range(6):
        best = balancer.order([a, b])[0]
        best.in_flight += 1
        picks.append(best.name)
    # b, with twice the weight, holds twice the streams.
    assert (a.in_flight, b.in_flight) == (2, 4)
    idle = [Up("x"), Up("y"), Up("z")]
    assert {balancer.order(idle)[0].name for _ in range(3)} == {"x", "y", "z"}


def test_failures_are_classified_on_the_gateway_errors() -> None:
    cases = [
        (UpstreamConnectError("x"), "connect", True),
        (UpstreamStreamRefused("x"), "refused", True),
        (UpstreamConnectionLost("x"), "connection_lost", True),
        (UpstreamTimeout("x"), "timeout", True),
        (UpstreamStatusError(503, "x"), "5xx", True),
        (UpstreamStatusError(501, "x"), "5xx", False),
        (UpstreamStatusError(529, "x"), "5xx", True),
        (UpstreamStatusError(429, "x", retry_after="7"), "429", True),
        (UpstreamStatusError(400, "x"), "4xx", False),
        (UpstreamStatusError(401, "x"), "auth", True),
        (UpstreamStatusError(403, "x"), "auth", True),
        (UpstreamProtocolError("x"), "protocol", False),
        (BadRequest("x"), "internal", False),
        (UpstreamError("x"), "other", False),
        (QueueTimeout("x"), "busy", True),
    ]
    for error, kind, retryable in cases:
        failure = classify(error)
        assert (failure.kind, failure.retryable(RETRY)) == (kind, retryable), error
    assert classify(UpstreamStatusError(429, "x", retry_after="7")).retry_after_s == 7
    assert not classify(UpstreamStatusError(404, "x")).upstream_at_fault
    assert classify(UpstreamStatusError(401, "x")).upstream_at_fault
    assert not classify(QueueFull("x")).upstream_at_fault


def test_retry_after_as_seconds_or_a_date() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def _router(*configs: UpstreamConfig, clock: list[float]) -> Router:
    upstreams = [
        Upstream(config=c, transport=None, provider=OpenAIProvider(),  # type: ignore[arg-type]
                 base_path="/v1", public_url=c.url,
                 breaker=CircuitBreaker(failures=2, cooldown_s=10),
                 admission=AdmissionQueue(c.max_inflight, 10, 1.0) if c.max_inflight else None)
        for c in configs
    ]
    return Router(RoutingConfig(tuple(configs)), upstreams, clock=lambda: clock[0])


def test_next_upstream_by_priority_then_untried_then_panic() -> None:
    now = [0.0]
    router = _router(UpstreamConfig("a", "http://a/v1"),
                     UpstreamConfig("b", "http://b/v1", priority=1),
                     UpstreamConfig("c", "http://c/v1", priority=2), clock=now)
    a, b, c = router.upstreams
    assert router.next_upstream([a, b, c], ()) is a
    assert router.next_upstream([a, b, c], (a,)) is b
    assert router.next_upstream([a, b, c], (a, b, c)) is a  # all tried: from the top again
    a.breaker.failure(0)
    a.breaker.failure(0)  # open for the cooldown, to 10
    b.breaker.failure(0, hold_until=5)  # open for its Retry-After
    c.breaker.failure(0, hold_until=3)
    # Panic: every circuit open; a (cooldown to 10) is free later than c (3).
    assert router.next_upstream([a, b, c], ()) is c
    now[0] = 4
    assert router.next_upstream([a, b, c], ()) is c  # half-open now: usable
    c.breaker.acquire(4)  # its probe is out: no circuit lets requests through
    assert router.next_upstream([a, b, c], ()) is c  # panic: still the soonest free


def test_an_upstream_at_its_admission_limit_is_passed_over_while_another_has_room() -> None:
    router = _router(UpstreamConfig("small", "http://s/v1", weight=100, max_inflight=1),
                     UpstreamConfig("big", "http://b/v1"), clock=[0.0])
    small, big = router.upstreams
    assert router.next_upstream([small, big], ()) is small
    assert small.admission is not None
    ticket = small.admission.enqueue(0)
    assert router.next_upstream([small, big], ()) is big
    ticket.release()
    assert router.next_upstream([small, big], ()) is small


def test_an_unknown_model_has_no_plan() -> None:
    router = _router(UpstreamConfig("a", "http://a/v1", models=("m",)), clock=[0.0])
    with pytest.raises(ModelNotFound):
        router.plan({"model": "x", "messages": []}, "x")
    plan = router.plan({"model": "m", "messages": []}, "m")
    assert list(plan.candidates) == list(router.upstreams)
