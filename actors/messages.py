"""The actors' vocabulary: how a stream ends, and what an actor tells its owner.

There is deliberately no inbound mailbox queue. A leaving subscriber must reset
the upstream *before its ``close()`` returns* (cancel in one tick), which a
queued message could only do one tick later; so the actor's state changes are
plain synchronous methods (join, leave, append, complete, fail), and the only
awaiting happens in the actor task's one loop over its source. What crosses a
boundary is recorded here as frozen values:

- a ``StreamEnd`` closes the actor's log: every subscriber reads the log to
  its end, then acts on this record (stop, or raise the failure);
- an ``ActorEvent`` is what the actor reports to the registry that owns it,
  synchronously, at the moment it happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType

__all__ = [
    "Abandoned",
    "ActorError",
    "ActorEvent",
    "Completed",
    "Failed",
    "JoinersClosed",
    "RegistryClosed",
    "Shutdown",
    "StreamEnd",
    "StreamEnded",
    "SlowReader",
    "StreamInterrupted",
    "UpstreamOpening",
]


class ActorError(Exception):
    """Base of the errors the coalescer itself raises."""


class RegistryClosed(ActorError):
    """The registry is shutting down: no new subscriptions, live streams end."""


class StreamInterrupted(ActorError):
    """The actor task was stopped from outside its own state machine."""


class SlowReader(ActorError):
    """This reader fell further behind its stream than the actor's lag bound
    allows (bytes behind the newest delta, or time without taking any): it
    is ended, so the log need not keep what only it still has to read."""


# -- how a stream ends ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    """The source ended normally; the log holds the whole answer."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The source (or admission) failed; subscribers get this very exception."""

    error: Exception
    #: The traceback at the failure: every subscriber re-raises the shared
    #: exception with this one, so its traceback does not grow by one chain of
    #: handler frames per subscriber (and keep all those frames alive).
    traceback: TracebackType | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Every subscriber left before the end; the source was reset (or never
    opened). Our own cancel: never remembered as a failure."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The registry closed (or the task was stopped from outside) mid-stream."""

    reason: BaseException


StreamEnd = Completed | Failed | Abandoned | Shutdown


# -- what an actor reports to its registry --------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamOpening:
    """Admitted: the actor is about to call ``open_source()``."""

    stream_id: int
    key: str


@dataclass(frozen=True, slots=True)
class JoinersClosed:
    """The log went past the replay budget: no new subscriber may join, since
    a late joiner could no longer be given the whole answer."""

    stream_id: int
    key: str
    replay_bytes: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: int
    key: str
    end: StreamEnd
    #: Seconds from the trigger (last subscriber gone, or shutdown) to
    #: ``source.reset()`` returned; None when no source had to be reset.
    reset_s: float | None


ActorEvent = UpstreamOpening | JoinersClosed | StreamEnded
