"""Registry: error TTL, no response cache, admission, the coalescing flags,
statistics, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.deltas import Delta
from actors.messages import RegistryClosed
from actors.registry import Registry, RegistryStatistics
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from gateway.app import remember_failure
from gateway.errors import QueueFull, QueueTimeout, UpstreamConnectError, UpstreamStatusError
from tests.unit.memory_source import MemoryUpstream, read_all, text

ERROR_TTL_S = 0.05


@pytest.fixture
def upstream() -> MemoryUpstream:
    return MemoryUpstream()


@pytest.fixture
def admission() -> AdmissionQueue:
    return AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30)


@pytest.fixture
async def registry(admission: AdmissionQueue) -> AsyncIterator[Registry]:
    registry = Registry(admission=admission, error_ttl_s=ERROR_TTL_S)
    yield registry
    await registry.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


def subscribe(
    registry: Registry,
    upstream: MemoryUpstream,
    request_id: str,
    key: str = "prompt-key",
    *,
    streaming: bool = True,
    coalesce: bool = True,
    arrived_at: float = 0.0,
) -> Subscription:
    return registry.subscribe(
        key,
        upstream.open,
        request_id=request_id,
        arrived_at=arrived_at,
        streaming=streaming,
        coalesce=coalesce,
    )


async def read_until_error(subscription: Subscription) -> tuple[list[Delta], BaseException]:
    received: list[Delta] = []
    try:
        async with asyncio.timeout(5):
            async for delta in subscription:
                received.append(delta)
    except Exception as exc:
        return received, exc
    raise AssertionError("the subscription ended without an error")


async def fail_stream(
    registry: Registry, upstream: MemoryUpstream, error: Exception, *request_ids: str
) -> list[Subscription]:
    opened = asyncio.ensure_future(upstream.next_source())
    subscriptions = [subscribe(registry, upstream, rid) for rid in request_ids]
    source = await opened
    source.push(*text("partial"))
    source.fail(error)
    for subscription in subscriptions:
        received, raised = await read_until_error(subscription)
        assert received == text("partial")  # everything logged before the failure
        assert raised is error  # the same exception object, for everyone
        assert subscription.outcome == "failed"
    return subscriptions


# -- error TTL ----------------------------------------------------------------------


async def test_a_failure_is_shared_then_remembered_for_the_ttl_only(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    error = UpstreamStatusError(500, "upstream exploded")
    await fail_stream(registry, upstream, error, "r1", "r2")
    assert registry.statistics().errors_cached == 1
    # Inside the TTL: the failure at once, no upstream call, no admission slot.
    echo = subscribe(registry, upstream, "r3")
    assert echo.role == "follower" and echo.queue_wait_s == 0.0
    assert await read_until_error(echo) == ([], error)
    assert upstream.open_started == 1
    stats = registry.statistics()
    assert (stats.errors_replayed_total, stats.followers_total, stats.actors) == (1, 2, 0)
    # The expiry is a loop timer; a later one on the same clock runs after it.
    await asyncio.sleep(ERROR_TTL_S * 2)
    assert registry.statistics().errors_cached == 0
    fresh = subscribe(registry, upstream, "r4")
    assert fresh.role == "leader"
    source = await upstream.next_source()
    source.push(*text("ok"))
    source.finish()
    assert await read_all(fresh) == text("ok")
    assert upstream.open_started == 2


async def test_a_failure_to_open_is_shared_too(registry: Registry, upstream: MemoryUpstream) -> None:
    error = UpstreamConnectError("connection refused")
    upstream.open_error = error
    leader, follower = subscribe(registry, upstream, "r1"), subscribe(registry, upstream, "r2")
    assert await read_until_error(leader) == ([], error)
    assert await read_until_error(follower) == ([], error)
    assert registry.statistics().upstream_calls_total == 1


async def test_a_reraised_failure_does_not_pile_up_tracebacks(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    error = UpstreamStatusError(503, "busy")
    await fail_stream(registry, upstream, error, "r1")
    depths = []
    for n in range(3):
        await read_until_error(subscribe(registry, upstream, f"echo-{n}"))
        depth, tb = 0, error.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert depths[0] == depths[1] == depths[2]


async def test_remember_failure_decides_what_is_remembered(upstream: MemoryUpstream) -> None:
    remembered: list[BaseException] = []

    def remember(exc: BaseException) -> bool:
        remembered.append(exc)
        return False

    registry = Registry(admission=AdmissionQueue(8, 8, 30), error_ttl_s=60, remember_failure=remember)
    error = UpstreamStatusError(400, "bad request")
    await fail_stream(registry, upstream, error, "r1")
    assert remembered == [error]
    assert registry.statistics().errors_cached == 0
    assert subscribe(registry, upstream, "r2").role == "leader"
    await registry.aclose()


@pytest.mark.parametrize(
    ("error", "cached"),
    [
        (UpstreamStatusError(500, "boom"), 1),
        (QueueFull("upstream queue full", retry_after_s=1), 0),
        (QueueTimeout("no slot in time"), 0),
    ],
    ids=["the upstream's failure", "our queue full", "our queue timeout"],
)
async def test_the_gateways_policy_remembers_only_the_upstreams_failures(
    upstream: MemoryUpstream, error: Exception, cached: int
) -> None:
    registry = Registry(
        admission=AdmissionQueue(8, 8, 30), error_ttl_s=60, remember_failure=remember_failure
    )
    await fail_stream(registry, upstream, error, "r1")
    assert registry.statistics().errors_cached == cached
    assert subscribe(registry, upstream, "r2").role == ("follower" if cached else "leader")
    await registry.aclose()


async def test_a_private_stream_failure_is_not_remembered(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    private = subscribe(registry, upstream, "r1", coalesce=False)
    source = await upstream.next_source()
    error = UpstreamStatusError(500, "boom")
    source.fail(error)
    assert await read_until_error(private) == ([], error)
    assert registry.statistics().errors_cached == 0
    assert subscribe(registry, upstream, "r2").role == "leader"


async def test_a_failure_is_not_remembered_while_a_newer_stream_takes_joiners(
    admission: AdmissionQueue, upstream: MemoryUpstream
) -> None:
    """A stream past MAX_REPLAY_BYTES takes no joiners, and the next
    identical request starts a newer one. The older stream's failure then
    answers no one: kept for the TTL, it would answer the requests after
    the newer stream's success with an older call's error."""
    registry = Registry(admission=admission, error_ttl_s=60, max_replay_bytes=100)
    try:
        old = subscribe(registry, upstream, "r1")
        old_source = await upstream.next_source()
        old_source.push(*text("x" * 100))  # past the budget: no joiners
        await until_unlisted(registry)
        newer = subscribe(registry, upstream, "r2")
        assert newer.role == "leader"
        newer_source = await upstream.next_source()
        error = UpstreamStatusError(500, "the old call broke")
        old_source.fail(error)
        assert await read_until_error(old) == (text("x" * 100), error)
        newer_source.push(*text("fine"))
        newer_source.finish()
        assert await read_all(newer) == text("fine")
        assert registry.statistics().errors_cached == 0
        fresh = subscribe(registry, upstream, "r3")
        assert fresh.role == "leader"
        (await upstream.next_source()).finish()
        assert await read_all(fresh) == []
    finally:
        await registry.aclose()


async def until_unlisted(registry: Registry, key: str = "prompt-key") -> None:
    """Until the stream for ``key`` takes no joiners (its actor has read
    what was pushed)."""
    async with asyncio.timeout(5):
        while registry.has(key):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0)


async def test_a_completed_stream_leaves_the_registry_at_once(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    first = subscribe(registry, upstream, "r1")
    source = await upstream.next_source()
    source.push(*text("answer"))
    source.finish()
    assert await read_all(first) == text("answer")
    assert registry.statistics().actors == 0
    # No response cache: the same prompt again is a new upstream call.
    again = subscribe(registry, upstream, "r2")
    assert again.role == "leader"
    await upstream.next_source()
    assert upstream.open_started == 2
    # The earlier subscription, still open, is unaffected.
    assert first.outcome == "complete" and registry.statistics().subscribers == 2


# -- admission ----------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_leader_waits_for_admission_followers_take_no_ticket(
    upstream: MemoryUpstream,
) -> None:
    clock = FakeClock(10.0)
    admission = AdmissionQueue(max_inflight=1, max_queue=4, queue_timeout_s=30, clock=clock)
    registry = Registry(admission=admission)
    busy = subscribe(registry, upstream, "busy", key="a", arrived_at=9.5)
    assert busy.queue_wait_s == 0.5
    busy_source = await upstream.next_source()
    waiting = subscribe(registry, upstream, "w", key="b", arrived_at=10.0)
    followers = [subscribe(registry, upstream, f"f{n}", key="b") for n in range(3)]
    assert (admission.inflight, admission.depth) == (1, 1)  # one ticket for all of "b"
    # Not admitted yet: no queue wait, for the followers no more than the leader.
    assert [s.queue_wait_s for s in (waiting, *followers)] == [None, None, None, None]
    assert upstream.open_started == 1  # "b" is not opened before admission
    clock.now = 12.25
    opened = asyncio.ensure_future(upstream.next_source())
    busy_source.finish()
    assert await read_all(busy) == []
    source = await opened
    assert waiting.queue_wait_s == 2.25
    assert [f.queue_wait_s for f in followers] == [0.0, 0.0, 0.0]  # they took no slot
    source.push(*text("b!"))
    source.finish()
    for subscription in (waiting, *followers):
        assert await read_all(subscription) == text("b!")
    assert upstream.open_started == 2
    await registry.aclose()


async def test_a_full_queue_refuses_the_leader_synchronously(upstream: MemoryUpstream) -> None:
    admission = AdmissionQueue(max_inflight=1, max_queue=0, queue_timeout_s=30)
    registry = Registry(admission=admission)
    subscribe(registry, upstream, "r1", key="a")
    with pytest.raises(QueueFull):
        subscribe(registry, upstream, "r2", key="b")
    # Nothing was created for the refused request; a follower needs no slot.
    stats = registry.statistics()
    assert (stats.actors, stats.subscribers, stats.leaders_total) == (1, 1, 1)
    assert subscribe(registry, upstream, "r3", key="a").role == "follower"
    await registry.aclose()


async def test_a_queue_timeout_is_shared_like_a_source_failure(upstream: MemoryUpstream) -> None:
    admission = AdmissionQueue(max_inflight=1, max_queue=4, queue_timeout_s=0.05)
    registry = Registry(admission=admission, error_ttl_s=60)
    subscribe(registry, upstream, "busy", key="a", arrived_at=admission.clock())
    now = admission.clock()
    waiting = [subscribe(registry, upstream, f"r{n}", key="b", arrived_at=now) for n in range(3)]
    errors = [(await read_until_error(s))[1] for s in waiting]
    assert isinstance(errors[0], QueueTimeout)
    assert errors[1] is errors[0] and errors[2] is errors[0]
    assert admission.depth == 0
    assert upstream.open_started == 1  # only "a"
    assert (await read_until_error(subscribe(registry, upstream, "again", key="b")))[1] is errors[0]
    await registry.aclose()


# -- flags --------------------------------------------------------------------------


async def test_coalescing_disabled_gives_every_request_its_own_stream(
    upstream: MemoryUpstream,
) -> None:
    registry = Registry(admission=AdmissionQueue(8, 8, 30), coalesce_enabled=False)
    one, two = subscribe(registry, upstream, "r1"), subscribe(registry, upstream, "r2")
    assert (one.role, two.role) == ("leader", "leader")
    assert one.stream_id != two.stream_id
    await registry.aclose()
    assert registry.statistics().upstream_calls_total == 0  # closed before any was opened


async def test_fanout_disabled_coalesces_only_non_streaming_requests(
    upstream: MemoryUpstream,
) -> None:
    registry = Registry(admission=AdmissionQueue(8, 8, 30), fanout_enabled=False)
    streams = [subscribe(registry, upstream, f"s{n}", streaming=True) for n in range(2)]
    blocking = [subscribe(registry, upstream, f"b{n}", streaming=False) for n in range(2)]
    assert [s.role for s in streams] == ["leader", "leader"]
    assert [s.role for s in blocking] == ["leader", "follower"]
    assert len({s.stream_id for s in (*streams, *blocking)}) == 3
    await registry.aclose()


async def test_a_private_request_is_not_joined(registry: Registry, upstream: MemoryUpstream) -> None:
    private = subscribe(registry, upstream, "r1", coalesce=False)
    shared = subscribe(registry, upstream, "r2")
    assert (private.role, shared.role) == ("leader", "leader")
    # With both flags on, a streaming and a non-streaming request share.
    blocking = subscribe(registry, upstream, "r3", streaming=False)
    assert (blocking.role, blocking.stream_id) == ("follower", shared.stream_id)


# -- statistics and lifetime --------------------------------------------------------


async def test_statistics_is_a_frozen_snapshot(registry: Registry, upstream: MemoryUpstream) -> None:
    leader = subscribe(registry, upstream, "r1")
    subscribe(registry, upstream, "r2")
    source = await upstream.next_source()
    source.push(Delta(text="abc"))
    assert await anext(leader) == Delta(text="abc")
    stats = registry.statistics()
    assert stats == RegistryStatistics(
        actors=1,
        subscribers=2,
        errors_cached=0,
        replay_bytes=Delta(text="abc").replay_size(),
        leaders_total=1,
        followers_total=1,
        errors_replayed_total=0,
        abandoned_total=0,
        resets_total=0,
        upstream_calls_total=1,
    )
    with pytest.raises(AttributeError):
        stats.actors = 5  # type: ignore[misc]


async def test_aclose_ends_every_stream_and_leaves_no_task(upstream: MemoryUpstream) -> None:
    admission = AdmissionQueue(max_inflight=1, max_queue=4, queue_timeout_s=30)
    registry = Registry(admission=admission, error_ttl_s=60)
    await fail_stream(registry, upstream, UpstreamStatusError(500, "x"), "failed")
    running = subscribe(registry, upstream, "r1", key="a")
    source = await upstream.next_source()
    source.push(*text("so far", "logged"))
    assert await anext(running) == Delta(text="so far")
    queued = subscribe(registry, upstream, "r2", key="b")
    assert admission.depth == 1
    reason = RegistryClosed("bye")
    await registry.aclose(reason)
    assert source.reset_calls == 1
    assert (admission.inflight, admission.depth) == (0, 0)
    assert await read_until_error(running) == (text("logged"), reason)
    assert await read_until_error(queued) == ([], reason)
    stats = registry.statistics()
    assert (stats.actors, stats.errors_cached, stats.subscribers) == (0, 0, 3)
    assert upstream.open_started == 2  # "b" was never opened
    with pytest.raises(RegistryClosed):
        subscribe(registry, upstream, "late")
    for subscription in (running, queued):
        subscription.close()
    assert registry.statistics().subscribers == 1  # the one from fail_stream
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await registry.aclose()  # idempotent


async def test_aclose_default_reason_is_registry_closed(registry: Registry, upstream: MemoryUpstream) -> None:
    subscription = subscribe(registry, upstream, "r1")
    await registry.aclose()
    _, raised = await read_until_error(subscription)
    assert isinstance(raised, RegistryClosed)


async def test_wait_idle_returns_when_every_stream_ended(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    subscription = subscribe(registry, upstream, "r1")
    source = await upstream.next_source()
    idle = asyncio.ensure_future(registry.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    source.finish()
    async with asyncio.timeout(5):
        await idle
    assert registry.statistics().actors == 0
    assert await read_all(subscription) == []
