"""Property test: random schedules of joins, leaves (handler cancelled, closed,
explicitly cancelled), stalls, source chunks, failures and completions against
one prompt key, checked against a small model of what the coalescer promises:

- who leads and who follows (and which stream a follower joins);
- every subscriber that stays to the end gets exactly the source's sequence
  (from its resume point), then the end or the very failure object;
- a source is reset iff every subscriber left before its end, exactly once,
  inside the call in which the last one left;
- no upstream call for a follower, at most one per leader;
- at the end nothing is left: no actor, subscriber, log or task.

Each example runs on its own event loop, entirely in memory: ``settle()``
yields to the loop a fixed number of times, enough for every wake-up chain
an operation starts (no I/O, no timers), so the schedule is deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.deltas import Delta
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from tests.unit.memory_source import MemorySource

KEY = "the-prompt"
SETTLE_YIELDS = 20

# -- operations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    resume_after: int
    coalesce: bool
    batch_reader: bool


@dataclass(frozen=True)
class Leave:
    pick: int
    how: Literal["close", "handler_cancelled", "explicit_cancel"]


@dataclass(frozen=True)
class Stall:
    pick: int


@dataclass(frozen=True)
class Chunk:
    """``count`` deltas from the source in one go (one tick for the actor)."""

    pick: int
    count: int
    length: int


@dataclass(frozen=True)
class Finish:
    pick: int


@dataclass(frozen=True)
class Fail:
    pick: int
    remember: bool


Operation = Join | Leave | Stall | Chunk | Finish | Fail

picks = st.integers(min_value=0, max_value=7)
by_kind: dict[str, st.SearchStrategy[Operation]] = {
    "join": st.builds(
        Join,
        resume_after=st.sampled_from([0, 0, 0, 1, 3]),
        coalesce=st.sampled_from([True, True, True, False]),
        batch_reader=st.booleans(),
    ),
    "leave": st.builds(
        Leave,
        pick=picks,
        how=st.sampled_from(["close", "handler_cancelled", "explicit_cancel"]),
    ),
    "stall": st.builds(Stall, pick=picks),
    "chunk": st.builds(
        Chunk,
        pick=picks,
        count=st.integers(min_value=1, max_value=4),
        length=st.integers(min_value=0, max_value=40),
    ),
    "finish": st.builds(Finish, pick=picks),
    "fail": st.builds(Fail, pick=picks, remember=st.booleans()),
}
#: Streams should live long enough to be joined, lag and overflow: weight the
#: kinds (a chunk is six times as likely as the end of a stream).
operations = st.sampled_from(
    ["join"] * 4 + ["leave"] * 3 + ["stall"] * 2 + ["chunk"] * 6 + ["finish", "fail"]
).flatmap(by_kind.__getitem__)

# -- the model ----------------------------------------------------------------------


class Boom(Exception):
    def __init__(self, message: str, *, remember: bool) -> None:
        super().__init__(message)
        self.remember = remember


@dataclass
class StreamModel:
    stream_id: int
    leader: str
    shared: bool
    budget: int
    subscribers: set[str] = field(default_factory=set)
    replay_bytes: int = 0
    ended: bool = False
    abandoned: bool = False
    failure: Boom | None = None
    last_leaver: str | None = None

    @property
    def joinable(self) -> bool:
        return self.shared and not self.ended and self.replay_bytes <= self.budget


@dataclass
class ReaderModel:
    request_id: str
    subscription: Subscription
    stream: StreamModel
    #: Answered from a remembered failure.
    echo: bool
    start: int
    batch_reader: bool
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    received: list[Delta] = field(default_factory=list)
    error: BaseException | None = None
    left: bool = False
    task: asyncio.Task[None] | None = None


class Scenario:
    def __init__(self, budget: int, max_inflight: int) -> None:
        self.budget = budget
        self.registry = Registry(
            admission=AdmissionQueue(max_inflight=max_inflight, max_queue=64, queue_timeout_s=60),
            error_ttl_s=60,
            max_replay_bytes=budget,
            remember_failure=lambda exc: isinstance(exc, Boom) and exc.remember,
        )
        self.events: list[tuple[str, str]] = []
        self.upstream_calls: list[str] = []
        self.sources: dict[str, MemorySource] = {}
        self.streams: list[StreamModel] = []
        self.readers: list[ReaderModel] = []
        self.remembered: StreamModel | None = None
        self.serial = 0

    # -- environment ------------------------------------------------------------------

    def opener(self, request_id: str) -> Callable[[], Awaitable[MemorySource]]:
        async def open_source() -> MemorySource:
            self.upstream_calls.append(request_id)
            source = MemorySource(request_id, on_reset=lambda s: self.events.append(("reset", s.name)))
            self.sources[request_id] = source
            return source

        return open_source

    async def settle(self) -> None:
        for _ in range(SETTLE_YIELDS):
            await asyncio.sleep(0)

    async def read(self, reader: ReaderModel) -> None:
        subscription = reader.subscription
        try:
            while True:
                await reader.gate.wait()
                if reader.batch_reader:
                    batch = await subscription.read_batch()
                    if not batch:
                        break
                    reader.received.extend(batch)
                else:
                    try:
                        reader.received.append(await anext(subscription))
                    except StopAsyncIteration:
                        break
        except Exception as exc:
            reader.error = exc
        finally:
            self.leave_marked(reader.request_id, subscription.close)

    def leave_marked(self, request_id: str, leave: Callable[[], object]) -> None:
        """Run ``leave`` between two markers: a reset it causes lands between."""
        self.events.append(("leaving", request_id))
        leave()
        self.events.append(("left", request_id))

    # -- operations -------------------------------------------------------------------

    def open_sources(self) -> list[tuple[StreamModel, MemorySource]]:
        return [
            (stream, self.sources[stream.leader])
            for stream in self.streams
            if not stream.ended and stream.leader in self.sources
        ]

    async def apply(self, operation: Operation) -> None:
        match operation:
            case Join():
                self.join(operation)
            case Leave(pick=pick, how=how):
                active = [r for r in self.readers if not r.left and r.task and not r.task.done()]
                if active:
                    self.leave(active[pick % len(active)], how)
            case Stall(pick=pick):
                if self.readers:
                    gate = self.readers[pick % len(self.readers)].gate
                    gate.clear() if gate.is_set() else gate.set()
            case Chunk(pick=pick, count=count, length=length):
                if targets := self.open_sources():
                    stream, source = targets[pick % len(targets)]
                    for _ in range(count):
                        self.serial += 1
                        delta = Delta(text=f"{self.serial}:" + "x" * length)
                        source.push(delta)
                        stream.replay_bytes += delta.replay_size()
            case Finish(pick=pick):
                if targets := self.open_sources():
                    stream, source = targets[pick % len(targets)]
                    source.finish()
                    stream.ended = True
            case Fail(pick=pick, remember=remember):
                if targets := self.open_sources():
                    stream, source = targets[pick % len(targets)]
                    stream.failure = Boom(f"stream {stream.stream_id} failed", remember=remember)
                    source.fail(stream.failure)
                    stream.ended = True
                    # Never while a newer stream takes the joiners.
                    newer = any(s.joinable for s in self.streams)
                    if remember and stream.shared and not newer:
                        self.remembered = stream
        await self.settle()

    def join(self, operation: Join) -> None:
        request_id = f"r{len(self.readers)}"
        joinable = [s for s in self.streams if s.joinable] if operation.coalesce else []
        assert len(joinable) <= 1
        subscription = self.registry.subscribe(
            KEY,
            self.opener(request_id),
            request_id=request_id,
            arrived_at=time.monotonic(),  # the admission queue's clock
            coalesce=operation.coalesce,
            resume_after=operation.resume_after,
        )
        echo = False
        if joinable:
            stream, start = joinable[0], operation.resume_after
            assert (subscription.role, subscription.stream_id) == ("follower", stream.stream_id)
        elif operation.coalesce and self.remembered is not None:
            stream, start, echo = self.remembered, 0, True
            assert (subscription.role, subscription.stream_id) == ("follower", stream.stream_id)
        else:
            assert subscription.role == "leader"
            assert all(s.stream_id != subscription.stream_id for s in self.streams)
            stream = StreamModel(subscription.stream_id, request_id, operation.coalesce, self.budget)
            self.streams.append(stream)
            start = 0
        if not echo:
            stream.subscribers.add(request_id)
        reader = ReaderModel(request_id, subscription, stream, echo, start, operation.batch_reader)
        reader.gate.set()
        reader.task = asyncio.create_task(self.read(reader))
        self.readers.append(reader)

    def leave(self, reader: ReaderModel, how: str) -> None:
        reader.left = True
        stream = reader.stream
        if not reader.echo:
            stream.subscribers.discard(reader.request_id)
            if not stream.subscribers and not stream.ended:
                stream.ended = stream.abandoned = True
                stream.last_leaver = reader.request_id
        if how == "close":
            self.leave_marked(reader.request_id, reader.subscription.close)
        elif how == "explicit_cancel":
            results: list[bool] = []
            self.leave_marked(
                reader.request_id,
                lambda: results.append(self.registry.cancel(reader.request_id)),
            )
            assert results == [True]
        else:
            assert reader.task is not None
            reader.task.cancel()

    async def finish_everything(self) -> None:
        for reader in self.readers:
            reader.gate.set()
        for _ in range(len(self.streams) + 2):
            await self.settle()
            for stream, source in self.open_sources():
                source.finish()
                stream.ended = True
        assert all(stream.ended for stream in self.streams)
        tasks = [r.task for r in self.readers if r.task is not None]
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.registry.wait_idle()

    # -- the invariants ---------------------------------------------------------------

    def check(self) -> None:
        leaders = {s.leader for s in self.streams}
        # No upstream call for a follower; at most one per leader.
        assert set(self.upstream_calls) <= leaders
        assert len(self.upstream_calls) == len(set(self.upstream_calls))
        for reader in self.readers:
            self.check_reader(reader)
        for stream in self.streams:
            self.check_reset(stream)
        stats = self.registry.statistics()
        assert (stats.actors, stats.subscribers, stats.replay_bytes) == (0, 0, 0)
        assert stats.leaders_total == len(self.streams)
        assert stats.followers_total == len(self.readers) - len(self.streams)
        assert stats.upstream_calls_total == len(self.upstream_calls)
        assert stats.abandoned_total == sum(s.abandoned for s in self.streams)
        assert stats.resets_total == sum(s.abandoned and s.leader in self.sources for s in self.streams)

    def check_reader(self, reader: ReaderModel) -> None:
        stream = reader.stream
        source = self.sources.get(stream.leader)
        emitted = [] if source is None or reader.echo else source.emitted[reader.start :]
        if reader.left:
            assert reader.received == emitted[: len(reader.received)]
            return
        # Stayed to the end: everything, then the end or the same failure.
        assert reader.received == emitted
        assert reader.error is stream.failure
        assert reader.subscription.outcome == ("failed" if stream.failure else "complete")

    def check_reset(self, stream: StreamModel) -> None:
        source = self.sources.get(stream.leader)
        if source is None:
            # Never opened: abandoned before admission/open, nothing was sent.
            assert stream.abandoned
            return
        if not stream.abandoned:
            assert source.reset_calls == 0
            return
        assert source.reset_calls == 1
        at = self.events.index(("reset", source.name))
        # Within the very call in which the last subscriber left.
        assert self.events[at - 1] == ("leaving", stream.last_leaver)
        assert self.events[at + 1] == ("left", stream.last_leaver)


async def run_scenario(schedule: list[Operation], budget: int, max_inflight: int) -> None:
    scenario = Scenario(budget, max_inflight)
    for operation in schedule:
        await scenario.apply(operation)
    await scenario.finish_everything()
    scenario.check()
    await scenario.registry.aclose()
    assert scenario.registry.statistics().errors_cached == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.lists(operations, min_size=10, max_size=80),
    budget=st.sampled_from([0, 150, 400, 1 << 20]),
    max_inflight=st.sampled_from([1, 2, 8]),
)
def test_random_schedules_keep_the_coalescer_promises(
    schedule: list[Operation], budget: int, max_inflight: int
) -> None:
    asyncio.run(run_scenario(schedule, budget, max_inflight))
