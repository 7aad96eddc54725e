"""In-memory doubles of the actors' outside world: a scripted upstream.

``MemoryUpstream.open`` is an ``OpenSource``: each call is one upstream call
and creates a ``MemorySource`` that the test drives (push deltas, finish,
fail) and inspects (what it emitted, how often it was reset).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Callable

from actors.deltas import Delta


class _End:
    pass


_END = _End()


class MemorySource:
    """A Source whose stream the test writes."""

    def __init__(self, name: str, on_reset: Callable[[MemorySource], None] | None = None) -> None:
        self.name = name
        self.emitted: list[Delta] = []
        self.reset_calls = 0
        self.finished = False
        self._pending: deque[Delta | BaseException | _End] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_reset = on_reset

    def push(self, *deltas: Delta) -> None:
        self._feed(*deltas)
        self.emitted.extend(deltas)

    def finish(self) -> None:
        self._feed(_END)
        self.finished = True

    def fail(self, error: BaseException) -> None:
        self._feed(error)
        self.finished = True

    def reset(self) -> None:
        self.reset_calls += 1
        if self._on_reset is not None:
            self._on_reset(self)

    def _feed(self, *items: Delta | BaseException | _End) -> None:
        self._pending.extend(items)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> MemorySource:
        return self

    async def __anext__(self) -> Delta:
        while not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._pending.popleft()
        if isinstance(item, _End):
            self._pending.appendleft(item)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class MemoryUpstream:
    """Counts upstream calls; optionally holds ``open()`` until released."""

    def __init__(self, on_reset: Callable[[MemorySource], None] | None = None) -> None:
        self.sources: list[MemorySource] = []
        self.open_started = 0
        self.open_entered = asyncio.Event()
        self.open_gate: asyncio.Future[None] | None = None
        self.open_error: BaseException | None = None
        self._on_reset = on_reset
        self._opened: list[asyncio.Future[MemorySource]] = []

    async def open(self) -> MemorySource:
        self.open_started += 1
        self.open_entered.set()
        if self.open_gate is not None:
            await self.open_gate
        if self.open_error is not None:
            raise self.open_error
        source = MemorySource(f"source-{len(self.sources) + 1}", self._on_reset)
        self.sources.append(source)
        for waiter in self._opened:
            if not waiter.done():
                waiter.set_result(source)
        self._opened.clear()
        return source

    async def next_source(self, within_s: float = 5.0) -> MemorySource:
        """Wait for the next ``open()`` to create its source."""
        waiter: asyncio.Future[MemorySource] = asyncio.get_running_loop().create_future()
        self._opened.append(waiter)
        async with asyncio.timeout(within_s):
            return await waiter

    @property
    def latest(self) -> MemorySource:
        return self.sources[-1]


def text(*chunks: str) -> list[Delta]:
    return [Delta(text=chunk) for chunk in chunks]


async def read_all(deltas: AsyncIterable[Delta], within_s: float = 5.0) -> list[Delta]:
    """Drain a subscription, with a generous guard against hanging."""
    received: list[Delta] = []
    async with asyncio.timeout(within_s):
        async for delta in deltas:
            received.append(delta)
    return received
