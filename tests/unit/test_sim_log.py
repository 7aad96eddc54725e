"""The request log and the FIFO concurrency limit."""

from __future__ import annotations

import asyncio

import pytest

from gateway.sim.limiter import FifoLimiter
from gateway.sim.log import Record, RequestLog


def _open(log: RequestLog) -> Record:
    return log.open(
        path="/v1/messages",
        format="anthropic",
        http_version="HTTP/2",
        connection_id=1,
        authorization=True,
    )


async def test_wait_for_wakes_when_records_end() -> None:
    log = RequestLog()
    first, second = _open(log), _open(log)
    waiter = asyncio.create_task(log.wait_for(2, outcome="complete", timeout=5))
    await asyncio.sleep(0)
    assert log.finish(first, "complete")
    await asyncio.sleep(0)
    assert not waiter.done()
    assert log.finish(second, "complete", at=123.0)
    records = await waiter
    assert [r.id for r in records] == [1, 2]
    assert records[1].end == 123.0 and records[1].end_wall is not None


async def test_first_ending_wins_and_wait_times_out() -> None:
    log = RequestLog()
    record = _open(log)
    assert log.finish(record, "reset")
    assert not log.finish(record, "disconnect")
    assert log.records[0].outcome == "reset"
    with pytest.raises(TimeoutError):
        await log.wait_for(1, outcome="complete", timeout=0.01)


def test_log_is_bounded_and_ids_survive_clear() -> None:
    log = RequestLog(max_records=3)
    for _ in range(5):
        _open(log)
    assert [r.id for r in log.records] == [3, 4, 5]
    log.clear()
    assert log.records == []
    assert _open(log).id == 6


async def test_limiter_is_fifo_and_survives_cancelled_waiters() -> None:
    limiter = FifoLimiter(1)
    order: list[str] = []
    release = asyncio.Event()

    async def use(name: str) -> None:
        async with limiter.slot():
            order.append(name)
            await release.wait()

    holder = asyncio.create_task(use("a"))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(use(name)) for name in "bcd"]
    await asyncio.sleep(0)
    assert limiter.active == 1 and limiter.waiting == 3
    waiters[0].cancel()  # "b" leaves the queue
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *waiters[1:])
    assert order == ["a", "c", "d"]
    assert limiter.active == 0 and limiter.waiting == 0


async def test_unlimited_limiter_never_waits() -> None:
    limiter = FifoLimiter(0)
    async with limiter.slot(), limiter.slot():
        assert limiter.waiting == 0
