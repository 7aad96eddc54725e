"""AdmissionQueue: strict FIFO, shedding when full, timeout from arrival,
synchronous hand-off, no slot leaked under cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import AdmissionQueue, AdmissionTicket
from gateway.errors import QueueFull, QueueTimeout


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_free_slot_admits_at_once() -> None:
    clock = FakeClock(100.0)
    queue = AdmissionQueue(max_inflight=2, max_queue=4, queue_timeout_s=10, clock=clock)
    ticket = queue.enqueue(arrived_at=99.25)
    assert ticket.admitted
    assert ticket.admitted_at == 100.0
    assert ticket.queue_wait_s == 0.75
    await ticket.wait()  # returns without waiting
    assert (queue.inflight, queue.depth) == (1, 0)
    ticket.release()
    ticket.release()  # idempotent
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_waiters_are_admitted_in_arrival_order() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=30)
    holder = queue.enqueue(arrived_at=queue.clock())
    tickets = [queue.enqueue(arrived_at=queue.clock()) for _ in range(4)]
    assert (queue.inflight, queue.depth) == (1, 4)
    admitted: list[int] = []

    async def waiter(index: int, ticket: AdmissionTicket) -> None:
        await ticket.wait()
        admitted.append(index)
        ticket.release()

    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        # Start them in reverse: the order of wait() calls must not matter.
        for index in reversed(range(4)):
            group.create_task(waiter(index, tickets[index]))
        await asyncio.sleep(0)
        holder.release()
    assert admitted == [0, 1, 2, 3]
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_a_released_slot_passes_to_the_next_waiter_synchronously() -> None:
    clock = FakeClock(5.0)
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=30, clock=clock)
    first = queue.enqueue(arrived_at=5.0)
    second = queue.enqueue(arrived_at=5.0)
    assert not second.admitted
    clock.now = 7.5
    first.release()
    # No await in between: the slot went straight to the head of the queue.
    assert second.admitted
    assert second.admitted_at == 7.5
    assert second.queue_wait_s == 2.5
    assert (queue.inflight, queue.depth) == (1, 0)
    # A late arrival cannot overtake: the slot is taken.
    third = queue.enqueue(arrived_at=7.5)
    assert not third.admitted
    second.release()
    third.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_full_queue_sheds_at_once_with_retry_after() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=2, queue_timeout_s=30)
    tickets = [queue.enqueue(arrived_at=queue.clock()) for _ in range(3)]
    with pytest.raises(QueueFull) as raised:
        queue.enqueue(arrived_at=queue.clock())
    assert raised.value.status == 429
    assert raised.value.retry_after_s == 1
    assert raised.value.headers() == {"Retry-After": "1"}
    assert (queue.inflight, queue.depth) == (1, 2)
    for ticket in tickets:
        ticket.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_zero_queue_admits_or_sheds() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=0, queue_timeout_s=30)
    ticket = queue.enqueue(arrived_at=queue.clock())
    with pytest.raises(QueueFull):
        queue.enqueue(arrived_at=queue.clock())
    ticket.release()
    queue.enqueue(arrived_at=queue.clock()).release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_timeout_counts_from_arrival_not_from_wait() -> None:
    clock = FakeClock(50.0)
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=1.0, clock=clock)
    holder = queue.enqueue(arrived_at=50.0)
    # Arrived 1.5 s ago (say, a slow body): over the 1 s budget before waiting.
    late = queue.enqueue(arrived_at=48.5)
    on_time = queue.enqueue(arrived_at=49.5)
    with pytest.raises(QueueTimeout) as raised:
        await late.wait()
    assert raised.value.status == 503
    assert raised.value.message == (
        "no upstream slot came free: the request's place in the admission queue "
        "waited 1500 ms (limit 1000 ms)"
    )
    assert queue.depth == 1  # the timed-out ticket left the queue
    clock.now = 50.25
    holder.release()
    await on_time.wait()  # admitted: 0.75 s since arrival
    assert on_time.queue_wait_s == 0.75
    on_time.release()
    late.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_timeout_while_waiting_raises_and_leaves_the_queue() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=0.05)
    holder = queue.enqueue(arrived_at=queue.clock())
    ticket = queue.enqueue(arrived_at=queue.clock())
    behind = queue.enqueue(arrived_at=queue.clock())
    started = queue.clock()
    async with asyncio.timeout(5):
        with pytest.raises(QueueTimeout):
            await ticket.wait()
    assert queue.clock() - started >= 0.04
    assert queue.depth == 1
    holder.release()
    # The slot skips the timed-out ticket and goes to the next waiter.
    assert behind.admitted and not ticket.admitted
    behind.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=30)
    holder = queue.enqueue(arrived_at=queue.clock())
    ticket = queue.enqueue(arrived_at=queue.clock())
    task = asyncio.create_task(ticket.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (queue.inflight, queue.depth) == (1, 0)
    holder.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_cancellation_right_after_hand_off_does_not_leak_the_slot() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=30)
    holder = queue.enqueue(arrived_at=queue.clock())
    handed = queue.enqueue(arrived_at=queue.clock())
    next_in_line = queue.enqueue(arrived_at=queue.clock())
    task = asyncio.create_task(handed.wait())
    await asyncio.sleep(0)  # parked on its waiter
    holder.release()  # the slot is handed to `handed` ...
    assert handed.admitted
    task.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await task
    # The slot went on to the next waiter instead of leaking.
    assert next_in_line.admitted
    assert (queue.inflight, queue.depth) == (1, 0)
    next_in_line.release()
    handed.release()
    assert (queue.inflight, queue.depth) == (0, 0)


async def test_releasing_a_waiting_ticket_abandons_it() -> None:
    queue = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=30)
    holder = queue.enqueue(arrived_at=queue.clock())
    ticket = queue.enqueue(arrived_at=queue.clock())
    ticket.release()
    assert queue.depth == 0
    holder.release()
    assert not ticket.admitted
    assert (queue.inflight, queue.depth) == (0, 0)
    with pytest.raises(RuntimeError):
        await ticket.wait()


@pytest.mark.parametrize(("max_inflight", "max_queue", "timeout"), [(0, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)])
def test_rejects_nonsense_limits(max_inflight: int, max_queue: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        AdmissionQueue(max_inflight=max_inflight, max_queue=max_queue, queue_timeout_s=timeout)
