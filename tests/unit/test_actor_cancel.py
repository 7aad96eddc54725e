"""Cancel in one tick: the last subscriber leaving resets the upstream before
``close()`` returns; anyone else leaving (the leader included) changes nothing
for the others; an explicit cancel ends exactly that subscription."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.deltas import Delta
from actors.messages import StreamInterrupted
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from tests.unit.memory_source import MemorySource, MemoryUpstream, read_all, text


@pytest.fixture
def upstream() -> MemoryUpstream:
    return MemoryUpstream()


@pytest.fixture
def resets() -> list[float]:
    return []


@pytest.fixture
def admission() -> AdmissionQueue:
    return AdmissionQueue(max_inflight=1, max_queue=8, queue_timeout_s=30)


@pytest.fixture
async def registry(admission: AdmissionQueue, resets: list[float]) -> AsyncIterator[Registry]:
    registry = Registry(admission=admission, on_reset=resets.append)
    yield registry
    await registry.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


def subscribe(
    registry: Registry, upstream: MemoryUpstream, request_id: str, key: str = "prompt-key"
) -> Subscription:
    return registry.subscribe(key, upstream.open, request_id=request_id, arrived_at=0.0)


async def open_with_one_delta(
    registry: Registry, upstream: MemoryUpstream, *request_ids: str
) -> tuple[MemorySource, list[Subscription]]:
    opened = asyncio.ensure_future(upstream.next_source())
    subscriptions = [subscribe(registry, upstream, rid) for rid in request_ids]
    source = await opened
    source.push(Delta(text="first"))
    for subscription in subscriptions:
        assert await anext(subscription) == Delta(text="first")
    return source, subscriptions


async def test_the_last_leave_resets_the_source_before_close_returns(
    registry: Registry, upstream: MemoryUpstream, resets: list[float]
) -> None:
    source, (leader, follower) = await open_with_one_delta(registry, upstream, "r1", "r2")
    follower.close()
    assert source.reset_calls == 0 and leader.subscribers == 1
    leader.close()
    # No await since close(): the reset is already done.
    assert source.reset_calls == 1
    assert len(resets) == 1 and 0.0 <= resets[0] < 1.0
    stats = registry.statistics()
    assert (stats.actors, stats.subscribers) == (0, 0)
    assert (stats.abandoned_total, stats.resets_total) == (1, 1)
    assert (leader.outcome, follower.outcome) == ("cancelled", "cancelled")
    leader.close()  # idempotent
    await registry.wait_idle()
    assert source.reset_calls == 1


async def test_the_leader_leaving_does_not_cancel_the_followers(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    source, (leader, follower) = await open_with_one_delta(registry, upstream, "r1", "r2")
    leader.close()
    assert source.reset_calls == 0 and follower.subscribers == 1
    source.push(*text("second", "third"))
    source.finish()
    assert await read_all(follower) == text("second", "third")
    assert follower.outcome == "complete"
    assert source.reset_calls == 0
    assert registry.statistics().abandoned_total == 0


async def test_leaving_before_admission_takes_no_slot_and_sends_nothing(
    registry: Registry, upstream: MemoryUpstream, admission: AdmissionQueue
) -> None:
    source, (busy,) = await open_with_one_delta(registry, upstream, "busy")
    waiting = subscribe(registry, upstream, "waiting", key="another-key")
    assert (admission.inflight, admission.depth) == (1, 1)
    assert waiting.queue_wait_s is None
    waiting.close()
    assert admission.depth == 0  # the queue place is freed in the same tick
    busy.close()
    assert source.reset_calls == 1
    assert admission.inflight == 0
    await registry.wait_idle()
    assert upstream.open_started == 1
    assert registry.statistics().upstream_calls_total == 1


async def test_leaving_before_the_task_ran_never_opens(
    registry: Registry, upstream: MemoryUpstream, admission: AdmissionQueue
) -> None:
    subscription = subscribe(registry, upstream, "r1")
    subscription.close()
    assert admission.inflight == 0
    await registry.wait_idle()
    assert upstream.open_started == 0
    assert registry.statistics().abandoned_total == 1


async def test_leaving_while_the_request_is_being_sent_cancels_the_open(
    registry: Registry, upstream: MemoryUpstream, admission: AdmissionQueue
) -> None:
    upstream.open_gate = asyncio.get_running_loop().create_future()
    subscription = subscribe(registry, upstream, "r1")
    async with asyncio.timeout(5):
        await upstream.open_entered.wait()
    subscription.close()
    await registry.wait_idle()
    assert upstream.open_gate.cancelled()  # open() itself was cancelled
    assert upstream.sources == []
    assert admission.inflight == 0


async def test_handler_cancellation_is_a_leave(
    registry: Registry, upstream: MemoryUpstream, resets: list[float]
) -> None:
    source, (subscription,) = await open_with_one_delta(registry, upstream, "r1")
    reading = asyncio.Event()

    async def handler() -> None:
        async with subscription:
            reading.set()
            async for _ in subscription:
                pass

    task = asyncio.create_task(handler())
    async with asyncio.timeout(5):
        await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.reset_calls == 1
    assert len(resets) == 1
    assert subscription.outcome == "cancelled"


async def test_explicit_cancel_ends_only_that_subscription(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    source, (leader, follower) = await open_with_one_delta(registry, upstream, "r1", "r2")
    leader_read = asyncio.ensure_future(read_all(leader))
    follower_read = asyncio.ensure_future(read_all(follower))
    await asyncio.sleep(0)  # one yield: both readers run and park
    assert registry.cancel("r1") is True
    assert registry.cancel("r1") is False  # gone once cancelled
    assert registry.cancel("unknown") is False
    # The cancelled reader is woken and stops...
    assert await leader_read == []
    assert leader.outcome == "cancelled"
    # ... and the stream goes on for the other one.
    source.push(*text("second", "third"))
    source.finish()
    assert await follower_read == text("second", "third")
    assert follower.outcome == "complete"
    assert source.reset_calls == 0


async def test_explicit_cancel_of_the_last_subscriber_resets_in_the_call(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    source, (subscription,) = await open_with_one_delta(registry, upstream, "r1")
    parked = asyncio.ensure_future(subscription.read_batch())
    await asyncio.sleep(0)
    assert registry.cancel("r1") is True
    assert source.reset_calls == 1
    assert await parked == ()
    assert subscription.outcome == "cancelled"


async def test_after_an_abandoned_stream_the_key_starts_fresh(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    source, (first,) = await open_with_one_delta(registry, upstream, "r1")
    first.close()
    again = subscribe(registry, upstream, "r2")
    assert again.role == "leader" and again.stream_id != first.stream_id
    await upstream.next_source()
    assert upstream.open_started == 2
    again.close()
    assert upstream.latest.reset_calls == 1


async def test_an_actor_task_stopped_from_outside_still_ends_its_stream(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    source, (subscription,) = await open_with_one_delta(registry, upstream, "r1")
    (task,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("stream-actor-")]
    task.cancel()  # not through leave() or aclose(): say, a stray cancel
    async with asyncio.timeout(5):
        with pytest.raises(StreamInterrupted):
            await anext(subscription)
    assert source.reset_calls == 1
    assert subscription.outcome == "failed"
    assert registry.statistics().actors == 0
