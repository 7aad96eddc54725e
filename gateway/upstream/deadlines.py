"""Many deadlines behind one event-loop timer.

Every open upstream stream keeps a read deadline (the first token's, then
the idle gap's: gateway/upstream/source.py), and almost none ever fires. A
loop timer each costs ~580 bytes under uvloop (the handle, the libuv timer,
a copy of the context, the arguments), held by every idle stream; an entry
in one heap ~145. nginx keeps its timers the same way: one tree, one
timeout for the earliest.

A cancelled entry stays in the heap with its callback cleared (the timer
stays as it is too), and the heap is rebuilt without such entries once they
outnumber the live ones: it holds at most about twice the live deadlines.
The timer is set for the earliest live entry whenever it fires, so an entry
cancelled early costs at most the one wake-up it was the target of.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
from collections.abc import Callable
from itertools import count

__all__ = ["RESOLUTION", "Deadline", "Deadlines"]

#: Below this many cancelled entries the heap is never rebuilt.
_COMPACT_MIN = 64

#: A deadline within this of the loop's clock counts as due. uvloop keeps
#: its clock and its timers in whole milliseconds, so a timer may fire up to
#: half a millisecond before its time; without the slack the timer would be
#: set again for a deadline already in the past, as a ``call_soon``, and spin
#: until the clock ticks over.
RESOLUTION = 0.001


class Deadline:
    """One scheduled callback; ``Deadlines.cancel`` it, or let it run once."""

    __slots__ = ("callback", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[[], None]) -> None:
        self.when = when
        self.seq = seq  # equal times run in the order they were set
        self.callback: Callable[[], None] | None = callback

    def __lt__(self, other: Deadline) -> bool:
        # No tuples: heappush calls this a few times per deadline set.
        if self.when != other.when:
            return self.when < other.when
        return self.seq < other.seq


class Deadlines:
    """``call_at`` and ``cancel`` in the loop's clock (``loop.time()``)."""

    __slots__ = ("_cancelled", "_context", "_heap", "_seq", "_timer", "_timer_at")

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._cancelled = 0
        self._seq = count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # The callbacks run in a context of their own, not in a copy of
        # whichever task's happened to set the timer.
        self._context = contextvars.Context()

    def __len__(self) -> int:
        """Deadlines set and neither run nor cancelled yet."""
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback`` at ``when`` (within ``RESOLUTION``). One set by a
        callback for a time already due runs in the same pass."""
        deadline = Deadline(when, next(self._seq), callback)
        heapq.heappush(self._heap, deadline)
        if when < self._timer_at:
            self._arm(when)
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        """Idempotent; a no-op for a deadline that already ran."""
        if deadline.callback is None:
            return
        deadline.callback = None
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and 2 * self._cancelled > len(self._heap):
            self._heap = [entry for entry in self._heap if entry.callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def close(self) -> None:
        """Drop every deadline and the loop timer (the owner shuts down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf
        for entry in self._heap:
            entry.callback = None
        self._heap.clear()
        self._cancelled = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._run_due, context=self._context)
        self._timer_at = when

    def _run_due(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        loop = asyncio.get_running_loop()
        due_by = loop.time() + RESOLUTION
        try:
            # self._heap, not a local: a callback's cancel() may rebuild it.
            while self._heap and self._heap[0].when <= due_by:
                entry = heapq.heappop(self._heap)
                callback, entry.callback = entry.callback, None
                if callback is None:
                    self._cancelled -= 1
                    continue
                try:
                    callback()
                except Exception as exc:
                    # As the loop does for its own callbacks: report it, and
                    # every other deadline still runs.
                    loop.call_exception_handler(
                        {"message": "deadline callback failed", "exception": exc}
                    )
        finally:
            # A callback may have set a deadline (and the timer) meanwhile,
            # or raised past the loop: the timer goes to the earliest live
            # entry left (cancelled ones on top would only wake it in vain).
            heap = self._heap
            while heap and heap[0].callback is None:
                heapq.heappop(heap)
                self._cancelled -= 1
            if heap and heap[0].when < self._timer_at:
                self._arm(heap[0].when)
