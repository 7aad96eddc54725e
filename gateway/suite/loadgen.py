"""Load shapes, as vLLM ``bench serve``, AIPerf and GuideLLM generate them.

Closed loop (no rate): ``concurrency`` workers, each sending its next request
as soon as its last one ended -- a fixed number in flight, the way a pool of
chat users behaves. Open loop (a rate): arrivals follow a gamma process with
shape ``burstiness`` and mean gap ``1/rate`` (burstiness 1 is Poisson, below 1
burstier, above 1 more regular, vLLM's knob), from a seeded RNG so a run can
be repeated; ``concurrency`` then caps what is in flight, and an arrival held
back by the cap waits *before* its request is timed (client-side queueing is
not TTFT: each job takes its own start time when it runs).

A job is an ``async`` callable returning its result; it must not raise for
its request's failures (the client records those). Results come back in job
order, whatever order they finished in.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

Job = Callable[[], Coroutine[Any, Any, T]]


@dataclass(frozen=True, slots=True)
class LoadShape:
    concurrency: int
    #: Requests per second (open loop); None: closed loop.
    rate: float | None = None
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be > 0")

    def describe(self) -> str:
        if self.rate is None:
            return f"closed loop, {self.concurrency} concurrent"
        kind = "Poisson" if self.burstiness == 1 else f"gamma, burstiness {self.burstiness:g}"
        return (
            f"open loop, {self.rate:g} req/s ({kind}, seed {self.seed}), "
            f"at most {self.concurrency} in flight"
        )


def arrival_gaps(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds between arrivals: gamma(shape=burstiness, scale=1/(rate*burstiness)),
    whose mean is 1/rate whatever the burstiness (vLLM's definition)."""
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


async def drive(
    jobs: Sequence[Job[T]],
    shape: LoadShape,
    *,
    on_done: Callable[[T], None] | None = None,
) -> list[T]:
    """Run ``jobs`` under ``shape``; ``on_done`` sees each result as it lands."""
    if shape.rate is None:
        return await _closed_loop(jobs, shape.concurrency, on_done)
    return await _open_loop(jobs, shape, on_done)


async def _closed_loop(
    jobs: Sequence[Job[T]], concurrency: int, on_done: Callable[[T], None] | None
) -> list[T]:
    results: dict[int, T] = {}
    pending = iter(range(len(jobs)))

    async def worker() -> None:
        # One shared iterator: a worker that finishes early takes the next job.
        for index in pending:
            result = await jobs[index]()
            results[index] = result
            if on_done is not None:
                on_done(result)

    async with asyncio.TaskGroup() as workers:
        for _ in range(min(concurrency, len(jobs))):
            workers.create_task(worker())
    return [results[index] for index in range(len(jobs))]


async def _open_loop(
    jobs: Sequence[Job[T]], shape: LoadShape, on_done: Callable[[T], None] | None
) -> list[T]:
    assert shape.rate is not None
    results: dict[int, T] = {}
    in_flight = asyncio.Semaphore(shape.concurrency)
    gaps = arrival_gaps(shape.rate, shape.burstiness, random.Random(shape.seed))
    loop = asyncio.get_running_loop()

    async def arrive(index: int) -> None:
        async with in_flight:
            result = await jobs[index]()
        results[index] = result
        if on_done is not None:
            on_done(result)

    async with asyncio.TaskGroup() as arrivals:
        # Arrival times are absolute (the next one is due a gap after the
        # last one was *due*), so a busy loop delays arrivals but never
        # lowers the offered rate.
        due = loop.time()
        for index in range(len(jobs)):
            if index > 0:
                due += next(gaps)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival process itself, not a wait for an event
            arrivals.create_task(arrive(index))
    return [results[index] for index in range(len(jobs))]

