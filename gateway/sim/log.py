"""The request log: what the simulator saw of each model request.

This is how tests and the TTFT suite observe the gateway from the upstream's
side: when a request arrived, when its first token left, how it ended (a
``reset`` or ``disconnect`` is the gateway cancelling) and when. Times are
``time.monotonic()``: CLOCK_MONOTONIC is system-wide on Linux, so another
process on the machine can compare them with its own clock.

A record is mutable state owned by the request that created it; the first
ending wins (a client's RST_STREAM racing the simulator's own reset keeps
whichever came first).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Outcome = Literal["pending", "complete", "disconnect", "reset", "failed"]
OUTCOMES: tuple[Outcome, ...] = ("pending", "complete", "disconnect", "reset", "failed")

#: Records kept; older ones drop off so a long benchmark cannot grow the log
#: without bound.
DEFAULT_MAX_RECORDS = 100_000


@dataclass(slots=True)
class Record:
    id: int
    path: str
    format: str
    http_version: str
    #: Which connection it came over (numbered from 1 per server, both protocols).
    connection_id: int
    #: Whether an Authorization or x-api-key header was present (never its value).
    authorization: bool
    arrival: float
    arrival_wall: float
    stream: bool = False
    #: The model the request named ("" when the body was unreadable).
    model: str = ""
    #: Hex sha256 of the canonical messages ("" when the body was unreadable).
    prompt_sha: str = ""
    first_token: float | None = None
    end: float | None = None
    end_wall: float | None = None
    outcome: Outcome = "pending"
    tokens_sent: int = 0
    #: The HTTP status sent; 0 while none was.
    status: int = 0

    @property
    def ended(self) -> bool:
        return self.outcome != "pending"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RequestLog:
    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self._records: deque[Record] = deque(maxlen=max_records)
        self._next_id = 1
        # Created only while someone waits, so ending a record costs nothing
        # in a benchmark nobody watches.
        self._changed: asyncio.Event | None = None

    @property
    def records(self) -> list[Record]:
        """A snapshot, oldest first."""
        return list(self._records)

    def open(
        self, *, path: str, format: str, http_version: str, connection_id: int, authorization: bool
    ) -> Record:
        """Log the arrival of a request now; it is pending until ``finish``."""
        record = Record(
            id=self._next_id,
            path=path,
            format=format,
            http_version=http_version,
            connection_id=connection_id,
            authorization=authorization,
            arrival=time.monotonic(),
            arrival_wall=time.time(),
        )
        self._next_id += 1
        self._records.append(record)
        self._notify()
        return record

    def finish(self, record: Record, outcome: Outcome, *, at: float | None = None) -> bool:
        """End a pending record (``at``: a monotonic time taken by the caller).

        Returns False, changing nothing, when the record had already ended.
        """
        if record.ended:
            return False
        record.outcome = outcome
        record.end = time.monotonic() if at is None else at
        record.end_wall = time.time() - (time.monotonic() - record.end)
        self._notify()
        return True

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def clear(self) -> None:
        """Forget every record (ids keep counting, so they stay unique)."""
        self._records.clear()

    def ended(self, outcome: Outcome | None = None) -> list[Record]:
        return [
            record
            for record in self._records
            if record.ended and (outcome is None or record.outcome == outcome)
        ]

    async def wait_for(
        self,
        count: int,
        *,
        outcome: Outcome | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - the long-poll's deadline is its API
    ) -> list[Record]:
        """Wait until at least ``count`` records have ended (with ``outcome``,
        if given) and return all such records; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self._wait(lambda: self.ended(outcome), count)

    async def wait_for_arrivals(
        self,
        count: int,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the long-poll's deadline is its API
    ) -> list[Record]:
        """Wait until at least ``count`` records exist, ended or not (a request
        has reached the simulator), and return them all."""
        async with asyncio.timeout(timeout):
            return await self._wait(lambda: self.records, count)

    async def _wait(self, select: Callable[[], list[Record]], count: int) -> list[Record]:
        """Until ``select()`` has ``count`` records; re-checked at each change."""
        while len(selected := select()) < count:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        return selected
