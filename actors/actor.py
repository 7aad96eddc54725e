"""StreamActor: one upstream stream, its replay log, its subscribers.

The log is the broadcast medium. The actor appends each Delta once; a
subscriber is only a cursor into the log (``Subscription``), so N subscribers
cost N integers, not N copies, a late joiner is a cursor at 0 and a resumed
client a cursor at its Last-Event-ID. The actor never writes to a subscriber
and never waits for one: a slow reader only lags behind its own cursor.

Waking readers is cheap: a reader with nothing left to read parks one future
in ``_waiters``; the first append after that resolves them all and starts a
fresh list, so a burst of deltas appended in one tick costs each reader one
wake, not one per delta. (One shared future awaited by every reader would be
cheaper still, but awaiting a future directly means a reader's cancellation
cancels it, waking every other reader with a CancelledError that is not
theirs; shielding it costs a future per reader anyway.)

Concurrency shape: every state change is a plain ``def`` (join, leave,
append, complete, fail, shutdown) running to completion; the only awaiting is
the actor task's one loop (admission, open, iterate the source). The actor
belongs to the registry, never to its first subscriber: the leader leaving is
just one subscriber leaving. Only the last one leaving ends the stream, and it
resets the source before ``leave()`` returns.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from actors.deltas import Delta, StreamInfo
from actors.messages import (
    Abandoned,
    ActorEvent,
    Completed,
    Failed,
    JoinersClosed,
    Shutdown,
    SlowReader,
    StreamEnd,
    StreamEnded,
    StreamInterrupted,
    UpstreamOpening,
)
from actors.ports import OpenSource, Source, Ticket

__all__ = ["Reader", "StreamActor"]

#: Once an actor takes no joiners, the log prefix every reader has passed can
#: go; try that when the retained log has doubled, and at least this many
#: deltas, so the O(readers) scan for the slowest cursor stays amortised.
_MIN_TRIM_DELTAS = 16


class Reader(Protocol):
    """What the actor needs to know about a subscriber: where it is, and how
    to end it when it lags past the bound."""

    @property
    def cursor(self) -> int: ...

    @property
    def waiting(self) -> bool:
        """Parked for the next delta after reading every one before it:
        what was appended since it has not had a turn to take, so it is not
        behind (not yet woken is not slow)."""
        ...

    def fall_behind(self, error: SlowReader) -> None: ...


@dataclass(frozen=True, slots=True)
class LagBound:
    """How far behind the newest delta a reader may fall once the stream
    takes no joiners (before that, the replay budget bounds the whole log).

    Like Redis's client-output-buffer-limit: past either limit the reader
    is ended with ``SlowReader`` and the other readers never wait for it.
    Checked as the log grows: a reader is ended before it is 1.5 times
    ``max_bytes`` behind, and once it has taken nothing for ``max_s`` while
    behind, at the next check after that."""

    max_bytes: int | None = None
    max_s: float | None = None


def _ignore(event: ActorEvent) -> None:
    del event


class StreamActor:
    """Owns one upstream stream from admission to its end."""

    # Slots: every open stream holds one, so its size is per-stream memory.
    __slots__ = (
        "key",
        "stream_id",
        "shared",
        "created",
        "info",
        "memo",
        "_max_replay_bytes",
        "_report",
        "_clock",
        "_log",
        "_log_base",
        "_log_bytes",
        "_trim_at",
        "_lag",
        "_lag_check_at",
        "_progress",
        "_accepting",
        "_readers",
        "_waiters",
        "_ticket",
        "_source",
        "_task",
        "_end",
    )

    def __init__(
        self,
        *,
        key: str,
        stream_id: int,
        max_replay_bytes: int,
        observer: Callable[[ActorEvent], None],
        clock: Callable[[], float],
        shared: bool = True,
        lag: LagBound | None = None,
    ) -> None:
        self.key = key
        self.stream_id = stream_id
        #: Findable by key (coalescing) rather than private to one request.
        self.shared = shared
        self._max_replay_bytes = max_replay_bytes
        self._report = observer
        self._clock = clock
        # The log: deltas with sequence numbers _log_base+1 .. _log_base+len.
        self._log: list[Delta] = []
        self._log_base = 0
        self._log_bytes = 0
        self._trim_at = _MIN_TRIM_DELTAS
        self._lag = lag
        self._lag_check_at = _lag_check_at(lag, 0)
        # Each reader's cursor when last seen moving, and when: only kept
        # once the log is trimmed (a time bound is set and joiners closed).
        self._progress: dict[Reader, tuple[int, float]] | None = None
        self._accepting = True
        self._readers: set[Reader] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._ticket: Ticket | None = None
        self._source: Source | None = None
        self._task: asyncio.Task[None] | None = None
        self._end: StreamEnd | None = None
        #: Unix seconds at the stream's start, one value for all its
        #: subscribers (OpenAI's ``created``): their frames are shared.
        self.created = int(time.time())
        #: What the upstream said about the whole answer (its resolved
        #: model), from the first delta that carried it; kept when the log
        #: is trimmed, so a subscriber at any cursor reads the same.
        self.info: StreamInfo | None = None
        #: Scratch tables for whoever encodes this stream's deltas (the HTTP
        #: face keeps each frame here, encoded once for every subscriber):
        #: each maps a delta's sequence number to its entry. Trimmed with the
        #: log, freed with it.
        self.memo: dict[object, dict[int, object]] = {}

    @classmethod
    def remembered(
        cls, *, key: str, stream_id: int, failure: Failed, clock: Callable[[], float]
    ) -> StreamActor:
        """An already-failed stream with an empty log and no task: what an
        identical request gets while the failure is remembered (error TTL)."""
        actor = cls(key=key, stream_id=stream_id, max_replay_bytes=0, observer=_ignore, clock=clock)
        actor._accepting = False
        actor._end = failure
        return actor

    # -- what subscribers read ---------------------------------------------------

    @property
    def end(self) -> StreamEnd | None:
        return self._end

    @property
    def appended(self) -> int:
        """Deltas appended so far: the sequence number of the last one."""
        return self._log_base + len(self._log)

    @property
    def accepting_joiners(self) -> bool:
        return self._accepting

    @property
    def subscriber_count(self) -> int:
        return len(self._readers)

    @property
    def replay_bytes(self) -> int:
        """What the retained log costs (Delta.replay_size units)."""
        return self._log_bytes

    @property
    def admitted_at(self) -> float | None:
        return None if self._ticket is None else self._ticket.admitted_at

    @property
    def unadmitted(self) -> bool:
        """Whether its stream took an admission ticket not admitted (yet or
        ever: still queued, shed, or left while queued)."""
        return self._ticket is not None and self._ticket.admitted_at is None

    def delta_after(self, cursor: int) -> Delta | None:
        """The delta with sequence number ``cursor + 1``, if logged yet."""
        index = cursor - self._log_base
        assert index >= 0, "cursor behind the trimmed log"
        if index < len(self._log):
            return self._log[index]
        return None

    def deltas_after(self, cursor: int, limit: int | None = None) -> Sequence[Delta]:
        """Every delta logged after ``cursor``, or the first ``limit`` of
        them (a slice of references)."""
        index = cursor - self._log_base
        assert index >= 0, "cursor behind the trimmed log"
        if index < len(self._log):
            return self._log[index:] if limit is None else self._log[index : index + limit]
        return ()

    def new_waiter(self) -> asyncio.Future[None]:
        """A future resolved at the next append or at the end of the stream."""
        waiter = asyncio.get_running_loop().create_future()
        if self._end is not None:
            waiter.set_result(None)
        else:
            self._waiters.append(waiter)
        return waiter

    # -- state changes (synchronous) --------------------------------------------------

    def join(self, reader: Reader) -> None:
        self._readers.add(reader)

    def leave(self, reader: Reader) -> None:
        """One subscriber leaves; the last one ends the stream right here."""
        if reader not in self._readers:
            return
        self._readers.remove(reader)
        if self._progress is not None:
            self._progress.pop(reader, None)
        if self._readers:
            return
        if self._end is None:
            self._finish(Abandoned(), stopped_at=self._clock(), cancel_task=True)
        # Nobody can read it any more: let the log go now, even if something
        # (a remembered failure's traceback) keeps this actor alive a while.
        self._log_base += len(self._log)
        self._log.clear()
        self._log_bytes = 0
        self.memo.clear()

    def shutdown(self, reason: BaseException) -> None:
        """End the stream for every subscriber with ``reason`` (registry closing)."""
        if self._end is None:
            self._finish(Shutdown(reason), stopped_at=self._clock(), cancel_task=True)

    def start(self, open_source: OpenSource, ticket: Ticket | None) -> asyncio.Task[None]:
        """Start the actor task; the caller (the registry) owns the task."""
        self._ticket = ticket
        self._task = asyncio.get_running_loop().create_task(
            self._run(open_source, ticket), name=f"stream-actor-{self.stream_id}"
        )
        return self._task

    def _append(self, delta: Delta) -> None:
        if delta.info is not None and self.info is None:
            self.info = delta.info
        self._log.append(delta)
        self._log_bytes += delta.replay_size()
        if self._accepting and self._log_bytes > self._max_replay_bytes:
            # Never a truncated answer: past the budget, no one new may join
            # (the next identical request gets a fresh actor instead).
            self._accepting = False
            self._report(JoinersClosed(self.stream_id, self.key, self._log_bytes))
        if not self._accepting and (
            len(self._log) >= self._trim_at or self._log_bytes >= self._lag_check_at
        ):
            self._trim()
        self._wake_readers()

    def _trim(self) -> None:
        """Drop the log prefix that every current reader has already read,
        after ending the readers past the lag bound."""
        if self._lag is not None:
            self._end_lagging_readers(self._lag)
        slowest = min((reader.cursor for reader in self._readers), default=self.appended)
        drop = min(slowest, self.appended) - self._log_base
        if drop > 0:
            self._log_bytes -= sum(delta.replay_size() for delta in self._log[:drop])
            del self._log[:drop]
            self._trim_memo(self._log_base + drop)
            self._log_base += drop
        self._trim_at = max(2 * len(self._log), _MIN_TRIM_DELTAS)
        self._lag_check_at = _lag_check_at(self._lag, self._log_bytes)

    def _trim_memo(self, upto: int) -> None:
        """Forget the memo entries of deltas up to ``upto`` (trimmed)."""
        for table in self.memo.values():
            if len(table) <= upto - self._log_base:
                for seq in [seq for seq in table if seq <= upto]:
                    del table[seq]
            else:
                for seq in range(self._log_base + 1, upto + 1):
                    table.pop(seq, None)

    def _end_lagging_readers(self, lag: LagBound) -> None:
        """End every reader past the bound (``SlowReader``); each leaves, so
        the last one leaving ends the stream as any last leave does."""
        # Bytes of the log before each position, once for all readers.
        before = list(itertools.accumulate((d.replay_size() for d in self._log), initial=0))
        total = before[-1]
        now = self._clock()
        if lag.max_s is not None and self._progress is None:
            self._progress = {}
        lagging: list[tuple[Reader, str]] = []
        for reader in self._readers:
            cursor = reader.cursor
            # A waiting reader read all there was: deltas appended in this
            # tick (one read of the upstream) are not its lag.
            behind = 0 if reader.waiting else (
                total - before[max(0, min(cursor - self._log_base, len(self._log)))]
            )
            if lag.max_bytes is not None and behind > lag.max_bytes:
                lagging.append((reader, f"{behind} bytes behind the stream"))
                continue
            if self._progress is None:
                continue
            seen = self._progress.get(reader)
            if seen is None or seen[0] != cursor or behind == 0:
                self._progress[reader] = (cursor, now)
            elif lag.max_s is not None and now - seen[1] > lag.max_s:
                lagging.append((reader, f"read nothing for {now - seen[1]:.0f} s"))
        for reader, why in lagging:
            reader.fall_behind(SlowReader(f"the client reads too slowly: {why}"))
            self.leave(reader)

    def _finish(self, end: StreamEnd, *, stopped_at: float | None = None, cancel_task: bool = False) -> None:
        """Close the log with ``end`` and tell the registry.

        ``stopped_at`` marks a stream stopped from outside (last subscriber
        gone, shutdown): then the admission slot is freed and an open source
        reset right here, in the caller's tick, and the time to that reset
        reported. ``cancel_task`` also stops the actor task at its await.
        """
        self._end = end
        self._accepting = False
        source, self._source = self._source, None
        reset_s: float | None = None
        try:
            if stopped_at is not None:
                if self._ticket is not None:
                    self._ticket.release()
                if source is not None:
                    source.reset()
                    reset_s = self._clock() - stopped_at
            # Before the source is open this is the whole cancel: the task
            # dies at its await (admission or open) and nothing is sent.
            if cancel_task and self._task is not None:
                self._task.cancel()
        finally:
            self._wake_readers()
            self._report(StreamEnded(self.stream_id, self.key, end, reset_s))

    def _wake_readers(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the one loop ---------------------------------------------------------------

    async def _run(self, open_source: OpenSource, ticket: Ticket | None) -> None:
        try:
            if ticket is not None:
                await ticket.wait()
            self._report(UpstreamOpening(self.stream_id, self.key))
            source = await open_source()
            del open_source  # it holds the request (the prompt): not needed any more
            self._source = source
            async for delta in source:
                if self._end is not None:
                    # Ended (its last reader ended for lagging, inside
                    # _append) while the source still had deltas to hand
                    # out without waiting, so the task's cancel has not
                    # landed: the state is final, nothing more is logged.
                    break
                self._append(delta)
            self._source = None
            if self._end is None:
                self._finish(Completed())
        except Exception as exc:
            # A failing source (or a refused admission) is shared like data.
            # CancelledError is not an Exception: it propagates untouched.
            if self._end is None:
                self._source = None
                self._finish(Failed(exc, exc.__traceback__))
        except BaseException:
            # Cancelled by leave()/shutdown(): the state is already final. By
            # anyone else: end the stream so no reader waits forever.
            if self._end is None:
                interrupted = StreamInterrupted(f"stream {self.stream_id} was interrupted")
                self._finish(Shutdown(interrupted), stopped_at=self._clock())
            raise
        finally:
            if ticket is not None:
                ticket.release()


def _lag_check_at(lag: LagBound | None, log_bytes: int) -> float:
    """The retained log's size at which readers' lag is checked next: half
    the bound past the larger of the bound and the log now (amortised)."""
    if lag is None or lag.max_bytes is None:
        return float("inf")
    return max(log_bytes, lag.max_bytes) + lag.max_bytes // 2
