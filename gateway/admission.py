"""The admission queue: a strict-FIFO bound on upstream concurrency.

Every upstream call (every coalescing *leader*; followers take no slot) holds
one of ``max_inflight`` slots from admission until its stream ends. Requests
beyond that wait in a FIFO of at most ``max_queue`` tickets; one more is shed
at once with ``QueueFull`` (429 + Retry-After), so the queue itself is bounded.

Queue wait is measured from the moment the request *arrived* (the HTTP face
passes its arrival time), not from when the ticket was taken: time spent in
parsing, authentication or a slow body counts against ``queue_timeout_s``,
as it does for the client, who waits from arrival.

A released slot is handed to the next waiter synchronously, inside
``release()``: there is no instant in which a slot is free while someone
waits, so no late arrival can overtake the queue (strict FIFO), and no wake-up
can be lost. The price is that a waiter may be admitted in the very tick it is
cancelled; ``wait()`` then passes the slot on before re-raising, so a slot is
never leaked.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.errors import QueueFull, QueueTimeout

__all__ = ["AdmissionQueue", "AdmissionTicket"]


class _TicketState(enum.Enum):
    WAITING = "waiting"
    ADMITTED = "admitted"
    #: Done: a slot was given back, or the ticket left the queue unadmitted.
    RELEASED = "released"


class AdmissionTicket:
    """One request's place in the queue, then its slot."""

    __slots__ = ("_queue", "_state", "_waiter", "admitted_at", "arrived_at")

    def __init__(self, queue: AdmissionQueue, arrived_at: float) -> None:
        self._queue = queue
        self._state = _TicketState.WAITING
        self._waiter: asyncio.Future[None] | None = None
        self.arrived_at = arrived_at
        #: The queue clock's time of admission; None until admitted.
        self.admitted_at: float | None = None

    @property
    def admitted(self) -> bool:
        return self._state is _TicketState.ADMITTED

    @property
    def queue_wait_s(self) -> float | None:
        """Admission time minus arrival time, once admitted."""
        if self.admitted_at is None:
            return None
        return max(0.0, self.admitted_at - self.arrived_at)

    async def wait(self) -> None:
        """Return once admitted; raise ``QueueTimeout`` when the wait, counted
        from arrival, exceeds the queue timeout (the ticket then leaves)."""
        if self._state is _TicketState.ADMITTED:
            return
        if self._state is _TicketState.RELEASED:
            raise RuntimeError("admission ticket was released before it was admitted")
        queue = self._queue
        remaining = self.arrived_at + queue.queue_timeout_s - queue.clock()
        if remaining <= 0:
            self.release()
            raise QueueTimeout(self._timeout_message())
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            # asyncio.timeout runs on the loop's clock; with the default
            # time.monotonic queue clock the two agree.
            async with asyncio.timeout(remaining):
                await waiter
        except TimeoutError as exc:
            # (self.admitted, not a state comparison: mypy would keep the
            # narrowing from before the await.)
            if self.admitted:
                # The slot was handed over in the tick the timer fired: keep it.
                return
            self.release()
            raise QueueTimeout(self._timeout_message()) from exc
        except BaseException:
            # Cancelled (or worse): whether we are still queued or a slot was
            # handed to us a moment ago, nobody will use it now.
            self.release()
            raise
        finally:
            self._waiter = None
        if not self.admitted:
            raise RuntimeError("admission ticket was released while waiting")

    def release(self) -> None:
        """Give the slot back, or leave the queue unadmitted. Idempotent."""
        state = self._state
        if state is _TicketState.RELEASED:
            return
        self._state = _TicketState.RELEASED
        if state is _TicketState.ADMITTED:
            self._queue._pass_slot_on()
        else:
            self._queue._forget(self)
            self._wake()

    def _admit(self, now: float) -> None:
        self._state = _TicketState.ADMITTED
        self.admitted_at = now
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timeout_message(self) -> str:
        # "Its place": requests that join an identical one still queued share
        # its ticket, so the figure is the first arrival's wait, not theirs.
        waited_ms = (self._queue.clock() - self.arrived_at) * 1000.0
        limit_ms = self._queue.queue_timeout_s * 1000.0
        return (
            f"no upstream slot came free: the request's place in the admission queue "
            f"waited {waited_ms:.0f} ms (limit {limit_ms:.0f} ms)"
        )


class AdmissionQueue:
    """At most ``max_inflight`` admitted tickets, at most ``max_queue`` waiting."""

    def __init__(
        self,
        max_inflight: int,
        max_queue: int,
        queue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {queue_timeout_s}")
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        self._inflight = 0
        # Insertion-ordered, O(1) removal from anywhere (a waiter that times
        # out or is cancelled mid-queue) and O(1) pop from the front.
        self._waiting: OrderedDict[AdmissionTicket, None] = OrderedDict()

    @property
    def inflight(self) -> int:
        """Admitted tickets not yet released."""
        return self._inflight

    @property
    def depth(self) -> int:
        """Tickets waiting for a slot (counted in gateway_queue_depth)."""
        return len(self._waiting)

    def enqueue(self, arrived_at: float) -> AdmissionTicket:
        """Take a ticket: admitted at once when a slot is free, else queued.

        Raises ``QueueFull`` synchronously when ``max_queue`` tickets already
        wait, so the caller can still answer 429 before committing a response.
        """
        ticket = AdmissionTicket(self, arrived_at)
        # Invariant: someone waits only while every slot is taken, so a free
        # slot means the queue is empty and admitting now keeps FIFO order.
        if self._inflight < self.max_inflight:
            self._inflight += 1
            ticket._admit(self.clock())
        elif len(self._waiting) >= self.max_queue:
            raise QueueFull(f"admission queue full ({self.max_queue} waiting)", retry_after_s=1)
        else:
            self._waiting[ticket] = None
        return ticket

    def _pass_slot_on(self) -> None:
        if self._waiting:
            # The slot goes straight to the head of the queue: inflight stays.
            ticket, _ = self._waiting.popitem(last=False)
            ticket._admit(self.clock())
        else:
            self._inflight -= 1

    def _forget(self, ticket: AdmissionTicket) -> None:
        self._waiting.pop(ticket, None)
