"""Fan-out benchmark: one in-memory source, N subscribers, every delta to all.

Each subscriber reads with ``read_batch()`` (the HTTP face's path) and does
no I/O, so the figures are the coalescer's own cost: appending to the log,
waking the parked readers, each reader's task step. The source yields to the
loop after every delta, as a network source does between frames, so every
delta is its own wake-up round (the worst case: no batching).

    .venv/bin/python -m tests.perf.bench_fanout
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from actors.deltas import Delta
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue

SUBSCRIBER_COUNTS = (1, 100, 1_000, 10_000)


class _CountedSource:
    """Yields ``chunks`` deltas, one per loop iteration, then ends."""

    def __init__(self, chunks: int) -> None:
        self._chunks = chunks
        self.started_at = 0.0

    async def _deltas(self) -> AsyncIterator[Delta]:
        self.started_at = time.perf_counter()
        delta = Delta(text="token ")
        for _ in range(self._chunks):
            yield delta
            await asyncio.sleep(0)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._deltas()

    def reset(self) -> None:
        pass


async def _drain(subscription: Subscription) -> tuple[int, int]:
    delivered = wakes = 0
    async with subscription:
        while batch := await subscription.read_batch():
            delivered += len(batch)
            wakes += 1
    return delivered, wakes


async def bench_fanout(subscribers: int, chunks: int) -> dict[str, float]:
    """Fan ``chunks`` deltas out to ``subscribers``; figures from the source's
    first delta to the last subscriber's end of stream."""
    source = _CountedSource(chunks)

    async def open_source() -> _CountedSource:
        return source

    registry = Registry(admission=AdmissionQueue(max_inflight=1, max_queue=0, queue_timeout_s=60))
    try:
        subscriptions = [
            registry.subscribe("bench", open_source, request_id=f"r{n}", arrived_at=time.monotonic())
            for n in range(subscribers)
        ]
        async with asyncio.TaskGroup() as group:
            readers = [group.create_task(_drain(s)) for s in subscriptions]
        finished_at = time.perf_counter()
    finally:
        await registry.aclose()
    results = [reader.result() for reader in readers]
    delivered = sum(count for count, _ in results)
    if delivered != subscribers * chunks:
        raise AssertionError(f"delivered {delivered}, expected {subscribers * chunks}")
    elapsed = finished_at - source.started_at
    return {
        "subscribers": float(subscribers),
        "chunks": float(chunks),
        "elapsed_s": elapsed,
        "deliveries_per_s": delivered / elapsed,
        "per_chunk_us": elapsed / chunks * 1e6,
        "per_delivery_ns": elapsed / delivered * 1e9,
        "wakes_per_subscriber": sum(wakes for _, wakes in results) / subscribers,
    }


def _chunks_for(subscribers: int) -> int:
    # About 400k deliveries per row (a few seconds at most), at least 50 chunks.
    return max(50, min(2_000, 400_000 // subscribers))


async def _run_all() -> list[dict[str, float]]:
    return [await bench_fanout(n, _chunks_for(n)) for n in SUBSCRIBER_COUNTS]


def main() -> None:
    rows = asyncio.run(_run_all())
    print("| subscribers | chunks | deliveries/s | per chunk (µs) | per delivery (ns) | wakes/sub |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['subscribers']:,.0f} | {row['chunks']:,.0f} "
            f"| {row['deliveries_per_s']:,.0f} | {row['per_chunk_us']:,.1f} "
            f"| {row['per_delivery_ns']:,.0f} | {row['wakes_per_subscriber']:,.0f} |"
        )


if __name__ == "__main__":
    main()
