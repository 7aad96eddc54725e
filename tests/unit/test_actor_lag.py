"""Slow readers: the shared-frames memo is trimmed with the log, and a reader
past the lag bound (bytes behind, or time without reading) is ended with
SlowReader while the others go on, never waiting for it."""

from __future__ import annotations

import asyncio

import pytest

from actors.actor import LagBound
from actors.messages import SlowReader
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from tests.unit.memory_source import MemoryUpstream, read_all, text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_registry(lag: LagBound | None, clock: Clock | None = None) -> Registry:
    return Registry(
        admission=AdmissionQueue(max_inflight=8, max_queue=8, queue_timeout_s=30),
        # No joiners after the first delta: from there the log is trimmed.
        max_replay_bytes=0,
        lag=lag,
        **({"clock": clock} if clock is not None else {}),
    )


def subscribe(registry: Registry, upstream: MemoryUpstream, request_id: str) -> Subscription:
    return registry.subscribe("key", upstream.open, request_id=request_id, arrived_at=0.0)


async def test_the_memo_is_trimmed_with_the_log() -> None:
    upstream = MemoryUpstream()
    registry = make_registry(None)
    opened = asyncio.ensure_future(upstream.next_source())
    readers = [subscribe(registry, upstream, f"r{n}") for n in range(2)]
    source = await opened
    chunks = text(*(f"{n:03}" for n in range(400)))
    for seq, chunk in enumerate(chunks, start=1):
        source.push(chunk)
        for reader in readers:
            assert await anext(reader) is chunk
            # What the HTTP face does: one frame per delta, shared.
            reader.memo.setdefault("api", {}).setdefault(seq, b"frame")
    table = readers[0].memo["api"]
    # Bounded as the log is (it is trimmed when it has doubled), not 400.
    assert len(table) <= 32
    assert registry.statistics().replay_bytes <= 32 * chunks[0].replay_size()
    assert min(table) > 400 - 32 and max(table) == 400
    source.finish()
    for reader in readers:
        assert await read_all(reader) == []
        reader.close()
    await registry.aclose()


async def test_a_reader_too_many_bytes_behind_is_ended_and_the_others_go_on() -> None:
    upstream = MemoryUpstream()
    chunk_size = text("00000")[0].replay_size()
    registry = make_registry(LagBound(max_bytes=20 * chunk_size))
    opened = asyncio.ensure_future(upstream.next_source())
    fast = subscribe(registry, upstream, "fast")
    slow = subscribe(registry, upstream, "slow")
    source = await opened
    chunks = text(*(f"{n:05}" for n in range(300)))
    peak = 0
    for chunk in chunks:
        source.push(chunk)
        assert await anext(fast) is chunk  # never waits for the slow one
        peak = max(peak, registry.statistics().replay_bytes)
    # The slow one never read: it was ended once 20-30 deltas behind.
    assert peak <= 31 * chunk_size
    with pytest.raises(SlowReader, match="bytes behind"):
        slow.take_batch()
    assert slow.outcome == "failed"
    slow.close()
    source.finish()
    assert await read_all(fast) == []
    assert fast.outcome == "complete"
    assert source.reset_calls == 0  # the fast reader kept the stream
    fast.close()
    await registry.aclose()


async def test_a_reader_that_reads_nothing_for_too_long_is_ended() -> None:
    upstream = MemoryUpstream()
    clock = Clock()
    registry = make_registry(LagBound(max_s=5.0), clock)
    opened = asyncio.ensure_future(upstream.next_source())
    fast = subscribe(registry, upstream, "fast")
    stuck = subscribe(registry, upstream, "stuck")
    source = await opened
    for n, chunk in enumerate(text(*(f"{n:03}" for n in range(200)))):
        clock.now = n * 0.1  # 20 s in all
        source.push(chunk)
        assert await anext(fast) is chunk
    with pytest.raises(SlowReader, match="read nothing for"):
        await anext(stuck)
    stuck.close()
    source.finish()
    assert await read_all(fast) == []
    fast.close()
    await registry.aclose()


async def test_the_only_reader_ended_for_lag_resets_the_upstream() -> None:
    upstream = MemoryUpstream()
    chunk_size = text("00000")[0].replay_size()
    registry = make_registry(LagBound(max_bytes=10 * chunk_size))
    opened = asyncio.ensure_future(upstream.next_source())
    alone = subscribe(registry, upstream, "alone")
    source = await opened
    for chunk in text(*(f"{n:05}" for n in range(40))):
        source.push(chunk)
    await asyncio.sleep(0.01)  # the actor appends them
    with pytest.raises(SlowReader):
        alone.take_batch()
    assert source.reset_calls == 1  # last subscriber gone: the stream ends
    # ... and its log goes with it, though this subscription still holds the actor.
    assert alone._actor.replay_bytes == 0
    alone.close()
    await registry.aclose()


async def test_a_reader_waiting_for_more_is_not_behind_a_burst() -> None:
    """A reader parked for the next delta has read all there was: a burst
    appended in one tick, before it has had a turn, is not its lag."""
    upstream = MemoryUpstream()
    chunk_size = text("00000")[0].replay_size()
    registry = make_registry(LagBound(max_bytes=10 * chunk_size))
    opened = asyncio.ensure_future(upstream.next_source())
    waiting = subscribe(registry, upstream, "waiting")
    source = await opened
    assert waiting.take_batch() is None
    woken = waiting.readable()
    chunks = text(*(f"{n:05}" for n in range(40)))
    source.push(*chunks)  # 4 times the bound, appended in one tick
    await woken
    assert list(waiting.take_batch() or ()) == list(chunks)
    source.finish()
    assert await read_all(waiting) == []
    assert (waiting.outcome, source.reset_calls) == ("complete", 0)
    waiting.close()
    await registry.aclose()
