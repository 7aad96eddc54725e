"""What the actors need from the outside world, as Protocols.

The coalescer knows nothing of HTTP: the gateway hands it an ``OpenSource``
(open one upstream stream, decoded into Deltas) and an ``Admission`` (the
queue that bounds upstream concurrency). Tests hand it in-memory doubles.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from actors.deltas import Delta

__all__ = ["Admission", "OpenRelay", "OpenSource", "Source", "Ticket"]


class Source(Protocol):
    """One upstream stream, already requested, decoded into Deltas.

    Iteration ends at the end of the answer and raises (an ``Exception``) on a
    failure; when it raises, the source has already released whatever it held
    (the actor resets a source only when nobody is left to read it).
    """

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def reset(self) -> None:
        """Abandon the stream now: the cancel is written to the wire (HTTP/2
        RST_STREAM, RFC 9113 §6.4, or the HTTP/1.1 connection closed) before
        this returns. Synchronous, idempotent, a no-op once the stream ended;
        never raises."""
        ...


#: Open one upstream stream: returns once the request is written, before any
#: answer. Called by the actor after admission, at most once per actor. If the
#: awaiting task is cancelled while this runs, it must leave nothing open
#: (reset what it already wrote): that is how a request whose every subscriber
#: left before the upstream answered is cancelled.
OpenSource = Callable[[], Awaitable[Source]]

#: Open the stream of an answer that another process owns (its log, read
#: from its first delta, as one more subscriber of that process's actor).
#: The actor reading it takes no admission slot: no upstream call is made
#: here. Resetting the Source leaves the owner's stream, which resets the
#: upstream there if that was its last subscriber. How the owner is found
#: and reached is the caller's business (cluster mode, gateway/cluster).
OpenRelay = Callable[[], Awaitable[Source]]


class Ticket(Protocol):
    """A place in the admission queue, then an upstream slot."""

    @property
    def admitted_at(self) -> float | None:
        """Monotonic time of admission; None while waiting or when refused."""
        ...

    async def wait(self) -> None:
        """Until admitted; raises (e.g. ``QueueTimeout``) when the wait, counted
        from the request's arrival, is over the queue timeout."""
        ...

    def release(self) -> None:
        """Give the slot back, or leave the queue if still waiting. Idempotent."""
        ...


class Admission(Protocol):
    def enqueue(self, arrived_at: float) -> Ticket:
        """Take a ticket (synchronously); raises at once (``QueueFull``) when
        the queue is full, so the caller can still refuse the request."""
        ...
