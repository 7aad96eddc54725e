"""Many deadlines behind one loop timer (gateway/upstream/deadlines.py), on
the test's running loop: order, cancellation, a bounded heap, failures."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream.deadlines import _COMPACT_MIN, RESOLUTION, Deadlines


async def test_deadlines_run_in_time_order_each_in_its_time():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[tuple[str, float, float]] = []
    done = asyncio.Event()
    start = loop.time()

    def note(name: str, when: float) -> None:
        ran.append((name, when, loop.time()))
        if len(ran) == 3:
            done.set()

    for name, delay in (("late", 0.06), ("early", 0.02), ("middle", 0.04)):
        when = start + delay
        deadlines.call_at(when, lambda name=name, when=when: note(name, when))
    assert len(deadlines) == 3
    await asyncio.wait_for(done.wait(), 5)
    assert [name for name, _, _ in ran] == ["early", "middle", "late"]
    # Never before its time, less the resolution uvloop's millisecond
    # timers need (without it the loop timer spins: RESOLUTION).
    assert all(at >= when - RESOLUTION for _, when, at in ran)
    assert len(deadlines) == 0 and deadlines._timer is None


async def test_a_cancelled_deadline_never_runs():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    done = asyncio.Event()
    first = deadlines.call_at(loop.time() + 0.01, lambda: ran.append("cancelled"))
    deadlines.call_at(loop.time() + 0.03, lambda: (ran.append("kept"), done.set()))
    deadlines.cancel(first)
    deadlines.cancel(first)  # idempotent
    assert len(deadlines) == 1
    await asyncio.wait_for(done.wait(), 5)
    assert ran == ["kept"]
    assert len(deadlines) == 0 and deadlines._heap == []


async def test_a_deadline_set_by_a_callback_runs_before_later_ones():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    done = asyncio.Event()
    start = loop.time()
    deadlines.call_at(start + 0.5, lambda: (ran.append("last"), done.set()))
    deadlines.call_at(
        start + 0.01,
        lambda: (ran.append("first"), deadlines.call_at(start + 0.02, lambda: ran.append("set by first"))),
    )
    await asyncio.wait_for(done.wait(), 5)
    assert ran == ["first", "set by first", "last"]


async def test_cancelled_entries_never_outnumber_the_live_ones_for_long():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    far = loop.time() + 3600
    entries = [deadlines.call_at(far + i, lambda: None) for i in range(1000)]
    for entry in entries[:900]:
        deadlines.cancel(entry)
    assert len(deadlines) == 100
    assert len(deadlines._heap) <= 2 * len(deadlines) + _COMPACT_MIN
    deadlines.close()
    assert len(deadlines) == 0 and deadlines._timer is None


async def test_a_failing_callback_is_reported_and_the_others_still_run():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    ran: list[str] = []
    done = asyncio.Event()
    when = loop.time() + 0.01

    def fail() -> None:
        raise RuntimeError("boom")

    try:
        deadlines.call_at(when, fail)
        deadlines.call_at(when, lambda: ran.append("same time, after"))
        deadlines.call_at(when + 0.02, lambda: (ran.append("later"), done.set()))
        await asyncio.wait_for(done.wait(), 5)
    finally:
        loop.set_exception_handler(None)
    assert ran == ["same time, after", "later"]
    assert [str(context["exception"]) for context in reported] == ["boom"]


async def test_close_drops_every_deadline_and_the_loop_timer():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    ran: list[str] = []
    deadlines.call_at(loop.time() + 0.01, lambda: ran.append("dropped"))
    timer = deadlines._timer
    assert timer is not None
    deadlines.close()
    assert timer.cancelled() and len(deadlines) == 0
    # A later deadline still works, on a new timer.
    done = asyncio.Event()
    deadlines.call_at(loop.time() + 0.02, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert ran == []


class CountedDeadlines(Deadlines):
    """Counts the loop timer's wake-ups."""

    fires = 0

    def _run_due(self) -> None:
        self.fires += 1
        super()._run_due()


async def test_cancelled_entries_cost_at_most_the_one_wake_up_they_were_the_target_of():
    loop = asyncio.get_running_loop()
    deadlines = CountedDeadlines()
    done = asyncio.Event()
    start = loop.time()
    cancelled = [deadlines.call_at(start + 0.01 + i * 0.002, lambda: None) for i in range(10)]
    deadlines.call_at(start + 0.06, done.set)
    for entry in cancelled:
        deadlines.cancel(entry)
    await asyncio.wait_for(done.wait(), 5)
    # The wake-up set for the first cancelled entry, then the live one's:
    # not one for each cancelled entry on the way.
    assert deadlines.fires == 2


def test_under_uvloop_the_timer_fires_about_once_per_deadline_not_in_a_spin():
    """uvloop's timers work in whole milliseconds and may fire early: a
    deadline not counted as due then would set the timer again, as a
    call_soon, until the clock ticks over (tens of thousands of wake-ups
    for 200 deadlines; RESOLUTION)."""
    uvloop = pytest.importorskip("uvloop")

    deadlines = CountedDeadlines()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        start = loop.time()
        ran = []
        for i in range(200):
            deadlines.call_at(start + 0.005 + i * 0.0003, lambda: ran.append(1))
        deadlines.call_at(start + 0.08, done.set)
        cancelled = [deadlines.call_at(start + 0.01 + i * 0.001, lambda: ran.append(0)) for i in range(50)]
        for entry in cancelled:
            deadlines.cancel(entry)
        await asyncio.wait_for(done.wait(), 5)
        assert ran == [1] * 200

    uvloop.run(main())
    # ~60 ms of deadlines: about one wake-up per millisecond at most.
    assert deadlines.fires < 200
