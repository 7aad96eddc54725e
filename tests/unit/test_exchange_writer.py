"""The writer with a real SQLite store: batches, the bounded queue, a batch
the database refuses, the flush on close."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.exchanges.metrics import ExchangeMetrics
from gateway.exchanges.record import Exchange, Usage
from gateway.exchanges.sqlite import SqliteStore
from gateway.exchanges.writer import MAX_QUEUE_BYTES, ExchangeWriter


def exchange(number: int, *, id: str | None = None) -> Exchange:
    return Exchange(
        id=id or f"xchg_{number:04d}", created=1_800_000_000.0 + number, model="m", upstream="u",
        process="h:1", messages=({"role": "user", "content": None, "length": 1, "sha256": "x"},),
        outcome="complete", finish_reason="stop", error=None, usage=Usage(1, 2), ttft_ms=1.0,
        duration_ms=2.0, subscribers=1, request_ids=(f"r{number}",), api_key_ids=(),
    )


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_records_queued_together_are_written_as_one_batch(tmp_path: Path):
    registry = CollectorRegistry()
    store = SqliteStore(str(tmp_path / "log.db"))
    writer = ExchangeWriter(store, ExchangeMetrics(registry), max_batch=50)
    await writer.start()
    for number in range(120):  # in one tick: the writer takes them in batches of 50
        writer.submit(exchange(number))
    async with asyncio.timeout(10):
        await writer.wait_written(120)
    listed = await store.recent(limit=1000)
    assert [e["id"] for e in listed] == [f"xchg_{n:04d}" for n in reversed(range(120))]
    assert metric(registry, "gateway_exchange_log_written_total") == 120
    assert writer.held_bytes == 0
    await writer.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_full_queue_drops_new_records_and_counts_them(tmp_path: Path):
    registry = CollectorRegistry()
    writer = ExchangeWriter(SqliteStore(str(tmp_path / "log.db")), ExchangeMetrics(registry),
                            max_queue=5)
    await writer.start()
    for number in range(8):  # before the writer task runs once
        writer.submit(exchange(number))
    assert (writer.queued, writer.dropped_total) == (5, 3)
    assert metric(registry, "gateway_exchange_log_dropped_total") == 3
    async with asyncio.timeout(10):
        await writer.wait_written(5)
    await writer.aclose()


async def test_a_refused_record_is_dropped_alone_and_writing_goes_on(tmp_path: Path):
    """The database refuses a batch for one bad record: the batch goes again
    one record at a time, and only the record refused alone is dropped."""
    registry = CollectorRegistry()
    store = SqliteStore(str(tmp_path / "log.db"))
    writer = ExchangeWriter(store, ExchangeMetrics(registry))
    await writer.start()
    writer.submit(exchange(1))
    async with asyncio.timeout(10):
        await writer.wait_written(1)
    # No model (the column is NOT NULL): the database refuses it.
    writer.submit(dataclasses.replace(exchange(2), model=None))  # type: ignore[arg-type]
    writer.submit(exchange(3))
    writer.submit(exchange(5))  # the three, queued in one tick, go as one batch
    async with asyncio.timeout(10):
        await writer.wait_written(3)
    writer.submit(exchange(4))
    async with asyncio.timeout(10):
        await writer.wait_written(4)
    assert [e["id"] for e in await store.recent(limit=10)] == [
        "xchg_0004", "xchg_0005", "xchg_0003", "xchg_0001"]
    assert writer.dropped_total == 1
    assert metric(registry, "gateway_exchange_log_dropped_total") == 1
    # Written one by one, refused alone, written in a batch: nothing held.
    assert writer.held_bytes == 0
    await writer.aclose()


async def test_close_writes_what_is_queued(tmp_path: Path):
    path = str(tmp_path / "log.db")
    writer = ExchangeWriter(SqliteStore(path), ExchangeMetrics(CollectorRegistry()))
    await writer.start()
    for number in range(30):
        writer.submit(exchange(number))
    await writer.aclose()
    assert writer.written_total == 30 and writer.dropped_total == 0
    store = SqliteStore(path)
    await store.connect()
    assert len(await store.recent(limit=100)) == 30
    await store.aclose()


async def test_the_queue_is_bounded_by_bytes_while_the_database_is_down(tmp_path: Path):
    """With content on every record holds its whole prompt and answer: the
    queue in front of a database that is down must stop at its byte bound
    (64 MiB by default), however few records that is, and count the rest
    as dropped."""
    path = tmp_path / "log.db"
    path.write_bytes(b"not a SQLite database" * 100)  # the store cannot connect
    registry = CollectorRegistry()
    writer = ExchangeWriter(SqliteStore(str(path)), ExchangeMetrics(registry))
    await writer.start()
    assert not writer.connected
    prompt = "p" * 1_048_576  # one string shared by every record: the test holds 1 MiB
    fitting = fitting_bytes = 0
    for number in range(100):  # in one tick: all of them wait in the queue
        record = dataclasses.replace(
            exchange(number), messages=({"role": "user", "content": prompt},
                                        {"role": "assistant", "content": "a"}))
        if fitting_bytes + record.held_bytes() <= MAX_QUEUE_BYTES:
            fitting += 1
            fitting_bytes += record.held_bytes()
        writer.submit(record)
    # Each record counts for its 1 MiB prompt and a little more: as many as
    # fit in the 64 MiB.
    assert 60 < fitting < 64
    assert (writer.queued, writer.held_bytes) == (fitting, fitting_bytes)
    assert writer.dropped_total == 100 - writer.queued
    assert metric(registry, "gateway_exchange_log_dropped_total") == writer.dropped_total
    await writer.aclose()
    assert writer.dropped_total == 100 and writer.written_total == 0


async def test_a_record_is_let_go_for_the_bytes_it_was_queued_for(tmp_path: Path):
    """A record's messages are mappings, which can change while it waits:
    the writer lets it go for the size it counted at its submission, so
    what it holds comes back to nothing once it is written."""
    writer = ExchangeWriter(SqliteStore(str(tmp_path / "log.db")),
                            ExchangeMetrics(CollectorRegistry()))
    await writer.start()
    record = exchange(1)
    writer.submit(record)
    assert writer.held_bytes == record.held_bytes()
    record.messages[0]["content"] = "grown while queued " * 100
    async with asyncio.timeout(10):
        await writer.wait_written(1)
    assert writer.held_bytes == 0
    await writer.aclose()
