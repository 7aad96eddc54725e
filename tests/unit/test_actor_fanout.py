"""Fan-out and replay: one upstream call, every subscriber gets every delta,
late joiners from the start, resumed ones after their Last-Event-ID, the log
shared rather than copied, slow readers only lag, the replay budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from actors.deltas import Delta, StreamInfo, ToolCallDelta, Usage
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from tests.unit.memory_source import MemoryUpstream, read_all, text


@pytest.fixture
def upstream() -> MemoryUpstream:
    return MemoryUpstream()


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    registry = Registry(admission=AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30))
    yield registry
    await registry.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


def subscribe(
    registry: Registry, upstream: MemoryUpstream, request_id: str, *, resume_after: int = 0
) -> Subscription:
    return registry.subscribe(
        "prompt-key",
        upstream.open,
        request_id=request_id,
        arrived_at=0.0,
        resume_after=resume_after,
    )


async def test_followers_share_the_leaders_upstream_call(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    leader = subscribe(registry, upstream, "r1")
    followers = [subscribe(registry, upstream, f"r{n}") for n in (2, 3)]
    assert [s.role for s in (leader, *followers)] == ["leader", "follower", "follower"]
    assert {s.stream_id for s in (leader, *followers)} == {leader.stream_id}
    assert leader.subscribers == 3
    source = await opened
    chunks = text("Hel", "lo", "!")
    source.push(*chunks)
    source.finish()
    for subscription in (leader, *followers):
        assert await read_all(subscription) == chunks
        assert subscription.outcome == "complete"
        assert subscription.cursor == 3
        subscription.close()
    assert upstream.open_started == 1
    stats = registry.statistics()
    assert (stats.leaders_total, stats.followers_total, stats.upstream_calls_total) == (1, 2, 1)
    assert (stats.actors, stats.subscribers, stats.resets_total) == (0, 0, 0)
    assert source.reset_calls == 0


async def test_a_late_joiner_replays_from_the_start(registry: Registry, upstream: MemoryUpstream) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    leader = subscribe(registry, upstream, "r1")
    source = await opened
    source.push(*text("a", "b"))
    assert [await anext(leader), await anext(leader)] == text("a", "b")
    late = subscribe(registry, upstream, "r2")
    assert late.role == "follower" and late.cursor == 0
    source.push(*text("c"))
    source.finish()
    assert await read_all(late) == text("a", "b", "c")
    assert await read_all(leader) == text("c")
    assert upstream.open_started == 1


async def test_resume_after_continues_after_the_last_event_id(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    leader = subscribe(registry, upstream, "r1")
    source = await opened
    source.push(*text("1", "2", "3"))
    resumed = subscribe(registry, upstream, "r1-again", resume_after=2)
    ahead = subscribe(registry, upstream, "r3", resume_after=4)  # beyond the log: waits
    assert (resumed.role, resumed.cursor) == ("follower", 2)
    source.push(*text("4", "5"))
    source.finish()
    assert await read_all(resumed) == text("3", "4", "5")
    assert resumed.cursor == 5
    assert await read_all(ahead) == text("5")
    assert await read_all(leader) == text("1", "2", "3", "4", "5")


async def test_resume_without_a_live_stream_starts_a_new_one_from_zero(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    resumed = subscribe(registry, upstream, "r1", resume_after=7)
    assert (resumed.role, resumed.cursor) == ("leader", 0)
    source = await opened
    source.push(*text("x"))
    source.finish()
    assert await read_all(resumed) == text("x")


async def test_the_log_is_the_broadcast_medium_not_copies(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    subscriptions = [subscribe(registry, upstream, f"r{n}") for n in range(50)]
    source = await opened
    chunks = [
        Delta(reasoning="thinking"),
        Delta(tool_calls=(ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a"'),)),
        Delta(text="done", finish_reason="stop"),
        Delta(usage=Usage(prompt_tokens=3, completion_tokens=4)),
    ]
    source.push(*chunks)
    assert await anext(subscriptions[0]) is chunks[0]  # the actor has logged them
    # One log for fifty subscribers: its cost does not depend on their number.
    assert registry.statistics().replay_bytes == sum(d.replay_size() for d in chunks)
    source.finish()
    batches = [await s.read_batch() for s in subscriptions[1:]]
    assert list(await subscriptions[0].read_batch()) == chunks[1:]
    for batch in batches:
        assert list(batch) == chunks
        # The very same Delta objects, every kind of delta included.
        assert all(mine is logged for mine, logged in zip(batch, chunks, strict=True))
    for subscription in subscriptions:
        assert await subscription.read_batch() == ()
        assert subscription.outcome == "complete"


async def test_read_batch_takes_everything_available_in_one_wake(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    reader = subscribe(registry, upstream, "r1")
    source = await opened
    source.push(*text("a", "b", "c"))  # the actor logs all three in one step
    assert list(await reader.read_batch()) == text("a", "b", "c")
    assert reader.cursor == 3
    source.finish()
    assert await reader.read_batch() == ()
    assert await reader.read_batch() == ()


async def test_at_end_once_every_delta_is_taken_and_the_stream_has_ended(
    registry: Registry, upstream: MemoryUpstream
) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    reader = subscribe(registry, upstream, "r1")
    source = await opened
    source.push(*text("a", "b"))
    assert list(await reader.read_batch()) == text("a", "b")
    assert not reader.at_end  # taken, but the stream is live
    source.push(*text("c"))
    source.finish()  # the actor logs "c" and the end in one step
    await reader.readable()
    assert not reader.at_end  # "c" is not taken yet
    assert list(reader.take_batch(1) or ()) == text("c")
    assert reader.at_end
    assert reader.take_batch() == ()
    assert reader.outcome == "complete"


async def test_a_slow_subscriber_only_lags(registry: Registry, upstream: MemoryUpstream) -> None:
    opened = asyncio.ensure_future(upstream.next_source())
    slow = subscribe(registry, upstream, "slow")
    fast = subscribe(registry, upstream, "fast")
    source = await opened
    chunks = text(*(str(n) for n in range(100)))
    source.push(*chunks)
    source.finish()
    # The stream runs to its end while `slow` has read nothing at all.
    assert await read_all(fast) == chunks
    await registry.wait_idle()
    assert registry.statistics().actors == 0
    assert slow.cursor == 0
    assert await read_all(slow) == chunks


async def test_past_the_replay_budget_the_next_request_gets_a_new_stream(
    upstream: MemoryUpstream,
) -> None:
    chunk = Delta(text="x" * 36)  # replay_size() == 100
    registry = Registry(
        admission=AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30),
        max_replay_bytes=250,
    )
    first_opened = asyncio.ensure_future(upstream.next_source())
    first = subscribe(registry, upstream, "r1")
    source = await first_opened
    source.push(chunk, chunk)
    assert await first.read_batch() == [chunk, chunk]
    joiner = subscribe(registry, upstream, "r2")  # 200 <= 250: still joinable
    assert (joiner.role, joiner.stream_id) == ("follower", first.stream_id)
    source.push(chunk)  # 300 > 250
    assert await anext(first) is chunk
    second_opened = asyncio.ensure_future(upstream.next_source())
    newcomer = subscribe(registry, upstream, "r3")
    assert newcomer.role == "leader" and newcomer.stream_id != first.stream_id
    second = await second_opened
    assert upstream.open_started == 2
    # Nobody got a truncated answer.
    source.push(chunk)
    source.finish()
    second.push(Delta(text="fresh"))
    second.finish()
    assert await read_all(first) == [chunk]
    assert await read_all(joiner) == [chunk] * 4
    assert await read_all(newcomer) == [Delta(text="fresh")]
    await registry.aclose()


async def test_past_the_budget_the_read_prefix_is_dropped(upstream: MemoryUpstream) -> None:
    registry = Registry(
        admission=AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30),
        max_replay_bytes=0,
    )
    opened = asyncio.ensure_future(upstream.next_source())
    reader = subscribe(registry, upstream, "r1")
    source = await opened
    chunks = text(*(f"{n:02}" for n in range(40)))
    for chunk in chunks:
        source.push(chunk)
        assert await anext(reader) is chunk
    # No one may join any more, so what every reader has read is let go:
    # only a bounded tail of the 40 deltas is still held.
    assert registry.statistics().replay_bytes < 16 * chunks[0].replay_size()
    source.finish()
    assert await read_all(reader) == []
    assert reader.outcome == "complete"
    await registry.aclose()


async def test_the_streams_info_outlives_the_trimmed_log(upstream: MemoryUpstream) -> None:
    """The upstream's resolved model rides on the first delta only; every
    reader sees it, at any cursor, after the delta that carried it is gone."""
    registry = Registry(
        admission=AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30),
        max_replay_bytes=0,
    )
    opened = asyncio.ensure_future(upstream.next_source())
    reader = subscribe(registry, upstream, "r1")
    source = await opened
    assert reader.info is None
    info = StreamInfo(model="gpt-real-2025", system_fingerprint="fp_1")
    first, *rest = text(*(f"{n:02}" for n in range(40)))
    for chunk in (replace(first, info=info), *rest):
        source.push(chunk)
        assert await anext(reader) is chunk
    assert registry.statistics().replay_bytes < 16 * first.replay_size()
    # A later info (a model named again) does not replace the first.
    source.push(Delta(text="x", info=StreamInfo(model="other")))
    assert (await anext(reader)).text == "x"
    assert reader.info == info
    source.finish()
    assert await read_all(reader) == []
    await registry.aclose()
