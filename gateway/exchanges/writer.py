"""The writer: a bounded queue and the one task that empties it in batches.

``submit()`` is synchronous and never waits: the stream that ended goes on
at once. The writer task takes whatever has queued (up to ``max_batch``) and
writes it as one batch, so under load batches grow by themselves and at
rest a record is written within a tick of its submission.

When the database is unreachable the task keeps the batch in hand and tries
again after a backoff (``retry_initial_s`` doubling up to ``retry_max_s``),
connecting again if need be (with nothing to write too: until it connects
the log cannot be read); meanwhile records wait in the queue, and once
``max_queue`` wait, or the records queued and in hand hold ``max_queue_bytes``
(with content on each holds its whole prompt and answer), new ones are
dropped: counted every time, logged once per outage (and once more when
writing resumes, with the count). A batch the database refuses outright is
dropped, counted and logged too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from gateway.exchanges.metrics import ExchangeMetrics
from gateway.exchanges.record import Exchange
from gateway.exchanges.store import ExchangeStore, StoreRejected, StoreUnavailable

log = structlog.get_logger("gateway")

#: EXCHANGE_LOG_QUEUE_BYTES's default.
MAX_QUEUE_BYTES = 64 * 1_048_576


class ExchangeWriter:
    def __init__(
        self,
        store: ExchangeStore,
        metrics: ExchangeMetrics,
        *,
        max_queue: int = 10_000,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
        max_batch: int = 500,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._max_batch = max_batch
        #: Records still to write one at a time, after a refused batch.
        self._one_by_one = 0
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._close_timeout_s = close_timeout_s
        #: Each record with its ``held_bytes()`` at submission: it is let go
        #: for exactly what it was counted for.
        self._queue: deque[tuple[Exchange, int]] = deque()
        #: Records taken from the queue and not yet written (the batch).
        self._in_hand = 0
        #: What the records queued and in hand were counted for.
        self._held_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        #: Set by ``aclose()``: a backoff then ends at once.
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Whether the store is connected and the last attempt worked.
        self.connected = False
        # Each outage is logged once: unavailable, dropping, writing again.
        self._down = False
        self._dropping = False
        self._dropped_unreported = 0
        self.written_total = 0
        self.dropped_total = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def held_bytes(self) -> int:
        """What the records queued and in hand hold (``Exchange.held_bytes``)."""
        return self._held_bytes

    async def start(self, *, connect_within_s: float = 2.0) -> None:
        """Connect once (so the log can be read as soon as the gateway
        serves), then start the task. A database that is down or slow now
        delays nothing more than ``connect_within_s``: the task keeps trying.
        A URL the store cannot use at all raises ``StoreMisconfigured``."""
        assert self._task is None, "start() once"
        try:
            async with asyncio.timeout(connect_within_s):
                await self.store.connect()
            self.connected = True
        except (StoreUnavailable, TimeoutError) as exc:
            await self._close_store()
            self._unavailable(StoreUnavailable(str(exc) or "connect timed out"))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="exchange-writer")

    def submit(self, exchange: Exchange) -> None:
        """Queue one exchange; drops it (counted) when the queue is full, by
        count or by bytes. A record over the byte bound on its own is still
        taken when nothing else waits: the database may well be up."""
        if self._closing:
            self._dropped(1, "shutting down")
            return
        size = exchange.held_bytes()
        if len(self._queue) >= self._max_queue or (
            self._held_bytes and self._held_bytes + size > self._max_queue_bytes
        ):
            self._dropped(1, "queue full")
            return
        self._queue.append((exchange, size))
        self._held_bytes += size
        self._wakeup.set()

    async def wait_written(self, total: int) -> None:
        """Until ``written_total`` reaches ``total`` (for tests and benches)."""
        if self.written_total >= total:
            return
        future = asyncio.get_running_loop().create_future()
        waiter = (total, future)
        self._waiters.append(waiter)
        try:
            await future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def aclose(self) -> None:
        """Write what is queued (for up to ``close_timeout_s``), then stop
        and close the store. What could not be written is counted as dropped."""
        self._closing = True
        self._closed.set()
        self._wakeup.set()
        task = self._task
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=self._close_timeout_s)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._queue:
            self._dropped(len(self._queue), "shutting down")
            self._queue.clear()
        if self._in_hand:
            self._dropped(self._in_hand, "shutting down")
            self._in_hand = 0
        self._held_bytes = 0
        for _, future in self._waiters:
            future.cancel()
        await self._close_store()

    async def _close_store(self) -> None:
        try:
            await self.store.aclose()
        except Exception:
            # Closing what already broke may fail too; the next connect starts afresh.
            log.warning("exchange log store did not close cleanly", exc_info=True)

    # -- the task -------------------------------------------------------------------

    async def _run(self) -> None:
        batch: list[tuple[Exchange, int]] = []
        delay = self._retry_initial_s
        while True:
            if not batch:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    if self.connected:
                        await self._wakeup.wait()
                    else:
                        delay = await self._reconnect(delay)
                    continue
                limit = 1 if self._one_by_one else self._max_batch
                while self._queue and len(batch) < limit:
                    batch.append(self._queue.popleft())
                self._in_hand = len(batch)
            try:
                if not self.connected:
                    await self.store.connect()
                    self.connected = True
                await self.store.write([exchange for exchange, _ in batch])
            except StoreUnavailable as exc:
                self.connected = False
                await self._close_store()
                self._unavailable(exc)
                if self._closing:
                    return  # aclose() counts the batch in hand and the queue
                await self._pause(delay, self._closed)
                delay = min(delay * 2, self._retry_max_s)
                continue
            except StoreRejected as exc:
                if len(batch) > 1:
                    # One bad record must not take the others with it: the
                    # batch goes again one record at a time, and only what
                    # is refused alone is dropped.
                    self._queue.extendleft(reversed(batch))
                    self._one_by_one = len(batch)
                    batch = []
                    self._in_hand = 0
                    continue
                self._one_by_one = max(self._one_by_one - 1, 0)
                log.error("exchange log refused an exchange", error=str(exc))
                self.dropped_total += len(batch)
                self._metrics.dropped.inc(len(batch))
                self._let_go(batch)
                batch = []
                continue
            except Exception:
                # A bug, not the database: the batch goes (sending it again
                # would fail again) and the writer lives on for the next one.
                log.exception("exchange log write failed", exchanges=len(batch))
                self.dropped_total += len(batch)
                self._metrics.dropped.inc(len(batch))
                self._let_go(batch)
                batch = []
                continue
            self._written(len(batch))
            self._one_by_one = max(self._one_by_one - len(batch), 0)
            self._let_go(batch)
            batch = []
            delay = self._retry_initial_s

    async def _reconnect(self, delay: float) -> float:
        """Connect with nothing to write: until the store connects, the log
        cannot be read either, whether streams run or not. After a failure,
        the backoff, cut short by a record or ``aclose()`` (the caller has
        cleared ``_wakeup``); returns the next backoff."""
        try:
            await self.store.connect()
        except StoreUnavailable as exc:
            await self._close_store()
            self._unavailable(exc)
            await self._pause(delay, self._wakeup)
            return min(delay * 2, self._retry_max_s)
        except Exception:
            # A bug, not the database: no retrying in a loop; the next
            # record tries again.
            log.exception("exchange log connect failed")
            await self._close_store()
            await self._wakeup.wait()
            return delay
        self.connected = True
        self._written(0)  # the outage is over: said once, as after a write
        return self._retry_initial_s

    async def _pause(self, delay: float, event: asyncio.Event) -> None:
        """The backoff before the next attempt, or less if ``event`` is set."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await event.wait()

    def _let_go(self, batch: list[tuple[Exchange, int]]) -> None:
        """The batch in hand is written or dropped: it holds nothing more."""
        self._held_bytes -= sum(size for _, size in batch)
        self._in_hand = 0

    def _unavailable(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            log.warning(
                "exchange log unavailable; exchanges wait in the queue",
                store=self.store.description,
                queued=len(self._queue),
                error=str(exc),
            )

    def _written(self, count: int) -> None:
        self.written_total += count
        self._metrics.written.inc(count)
        if self._down or self._dropping:
            log.info("exchange log writing again", store=self.store.description,
                     dropped=self._dropped_unreported)
            self._down = self._dropping = False
            self._dropped_unreported = 0
        if self._waiters:
            waiting = []
            for total, future in self._waiters:
                if self.written_total >= total:
                    if not future.done():
                        future.set_result(None)
                else:
                    waiting.append((total, future))
            self._waiters = waiting

    def _dropped(self, count: int, reason: str) -> None:
        self.dropped_total += count
        self._metrics.dropped.inc(count)
        self._dropped_unreported += count
        if not self._dropping:
            # Once until writing works again: an outage is one line, not one
            # per stream.
            self._dropping = True
            log.warning("exchange log dropping exchanges", reason=reason,
                        max_queue=self._max_queue, max_queue_bytes=self._max_queue_bytes,
                        store=self.store.description)
