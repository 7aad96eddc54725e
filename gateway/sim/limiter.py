"""A FIFO concurrency limit: the simulated model's batch size.

Requests beyond the limit wait in arrival order, and the wait counts before
their TTFT, as a loaded inference server's queue does. A released slot goes
straight to the oldest waiter, so an arrival in between cannot barge in
(asyncio.Semaphore's fairness has changed between patch releases, gh-90155).
The queue is bounded by the requests in flight, each a task holding a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FifoLimiter:
    def __init__(self, limit: int) -> None:
        """``limit`` slots; 0 means unlimited."""
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.limit == 0 or (self.active < self.limit and not self._waiters):
            self.active += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                # A release may already have skipped (and dropped) it.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:
                # The slot was handed to us in the same tick we were
                # cancelled: pass it on rather than lose it.
                self._release()
            raise

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter (``active`` unchanged),
        # so nobody arriving in between can take it.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
