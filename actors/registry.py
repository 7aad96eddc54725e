"""Registry: prompt key -> live actor; leaders and followers; the error TTL.

The first request for a key is the *leader*: it takes an admission ticket and
a new StreamActor task starts. Identical requests while that actor lives and
takes joiners are *followers*: a cursor into the same log, no ticket, no
upstream call. The registry owns every actor task (never its first caller) and
awaits them on ``aclose()``.

A stream that ended leaves the registry in the same tick: completed answers
are not cached. A failure is the exception: it is remembered for
``error_ttl_s`` (when ``remember_failure`` agrees) so that a burst of identical
requests gets it at once instead of hammering a failing upstream, and then
forgotten; only requests arriving inside that short window share it: a
failure is never pinned onto fresh requests the way a cached error would be
(a remembered 429 answering every later request). Our own cancels
(every subscriber left) are never remembered, nor is the failure of a
stream past its replay budget while a newer stream for its key takes
joiners.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.actor import LagBound, StreamActor
from actors.messages import (
    Abandoned,
    ActorEvent,
    Failed,
    JoinersClosed,
    RegistryClosed,
    StreamEnded,
    UpstreamOpening,
)
from actors.ports import Admission, OpenRelay, OpenSource, Ticket
from actors.subscription import Role, Subscription

__all__ = ["Registry", "RegistryClosed", "RegistryStatistics"]


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A snapshot for the metrics (gauges first, then monotonic counters)."""

    #: Actors whose stream has not ended (gateway_active_actors).
    actors: int
    #: Subscriptions not yet closed.
    subscribers: int
    #: Failures currently remembered (error TTL).
    errors_cached: int
    #: What the live actors' replay logs hold, in Delta.replay_size units.
    replay_bytes: int
    leaders_total: int
    #: Includes requests answered from a remembered failure.
    followers_total: int
    #: Requests answered at once with a remembered failure.
    errors_replayed_total: int
    #: Streams whose every subscriber left before the end.
    abandoned_total: int
    #: Open sources reset because nobody was left (or on shutdown).
    resets_total: int
    #: ``open_source()`` calls.
    upstream_calls_total: int


@dataclass(frozen=True, slots=True)
class _RememberedFailure:
    stream_id: int
    failure: Failed
    expiry: asyncio.TimerHandle


class Registry:
    """Key -> actor. All methods but ``wait_idle``/``aclose`` are synchronous."""

    def __init__(
        self,
        *,
        admission: Admission,
        error_ttl_s: float = 2.0,
        max_replay_bytes: int = 1 << 20,
        coalesce_enabled: bool = True,
        fanout_enabled: bool = True,
        remember_failure: Callable[[BaseException], bool] = lambda exc: True,
        on_reset: Callable[[float], None] | None = None,
        on_failure: Callable[[BaseException, int], None] | None = None,
        lag: LagBound | None = None,
        on_stream_end: Callable[[StreamEnded], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: Callable[[ActorEvent], None] | None = None,
    ) -> None:
        self._admission = admission
        self._error_ttl_s = error_ttl_s
        self._max_replay_bytes = max_replay_bytes
        self._coalesce_enabled = coalesce_enabled
        self._fanout_enabled = fanout_enabled
        self._remember_failure = remember_failure
        self._on_reset = on_reset
        #: Told once per failed stream: its error and how many subscribers
        #: it had when it failed (the HTTP face logs and counts it).
        self._on_failure = on_failure
        #: How far a reader may lag behind its stream (actors.actor.LagBound).
        self._lag = lag
        #: Told every stream's end, in its tick, after the registry's own
        #: bookkeeping (the gateway's exchange log listens here).
        self._on_stream_end = on_stream_end
        self._clock = clock
        #: Told every actor event after the registry has handled it.
        self._observer = observer
        #: Stream ids of the running actors that relay another process's log.
        self._relays: set[int] = set()
        self._stream_ids = itertools.count(1)
        #: Actors a new identical request may join (shared, taking joiners).
        self._joinable: dict[str, StreamActor] = {}
        #: Every actor whose stream has not ended, by stream id.
        self._running: dict[int, StreamActor] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Every running actor's task holds its done-callback while its stream
        # is open: one bound method for them all, run in an empty context of
        # its own rather than a copy of the caller's (~130 bytes per stream).
        self._discard_task = self._tasks.discard
        self._callback_context = contextvars.Context()
        self._failures: dict[str, _RememberedFailure] = {}
        self._by_request: dict[str, Subscription] = {}
        self._open_subscriptions = 0
        self._closed = False
        self._leaders_total = 0
        self._followers_total = 0
        self._errors_replayed_total = 0
        self._abandoned_total = 0
        self._resets_total = 0
        self._upstream_calls_total = 0

    # -- the handler's side ------------------------------------------------------------

    def subscribe(
        self,
        key: str,
        open_source: OpenSource,
        *,
        request_id: str,
        arrived_at: float,
        streaming: bool = True,
        coalesce: bool = True,
        resume_after: int = 0,
        relay: OpenRelay | None = None,
    ) -> Subscription:
        """Join the live stream for ``key`` or start one. Synchronous, so that
        ``QueueFull`` comes out of here before the caller commits its 200.

        ``resume_after=N`` (a Last-Event-ID) starts a follower after delta N;
        with no live stream the new one starts from 0.

        ``relay``: when no live stream is here, start one that reads another
        process's log instead of calling the upstream (no admission ticket);
        this request is its first follower, resumed after N if asked, since
        the relayed log is numbered as the owner's.
        """
        if self._closed:
            raise RegistryClosed("the registry is closed")
        if resume_after < 0:
            raise ValueError(f"resume_after must be >= 0, got {resume_after}")
        # STREAM_FANOUT_ENABLED=0 keeps coalescing for non-streaming requests only.
        shared = coalesce and self._coalesce_enabled and (self._fanout_enabled or not streaming)
        if shared:
            actor = self._joinable.get(key)
            if actor is not None:
                return self._attach(actor, "follower", request_id, arrived_at, resume_after)
            remembered = self._failures.get(key)
            if remembered is not None:
                self._errors_replayed_total += 1
                memo = StreamActor.remembered(
                    key=key,
                    stream_id=remembered.stream_id,
                    failure=remembered.failure,
                    clock=self._clock,
                )
                return self._attach(memo, "follower", request_id, arrived_at, 0)
        if relay is not None and shared:
            return self._start_relay(key, relay, request_id, arrived_at, resume_after)
        return self._lead(key, open_source, request_id, arrived_at, shared)

    def would_share(self, streaming: bool) -> bool:
        """Whether a request (that asks to coalesce) may share a stream."""
        return self._coalesce_enabled and (self._fanout_enabled or not streaming)

    def has(self, key: str) -> bool:
        """Whether an identical request would be answered here without a new
        stream: a live stream taking joiners, or a remembered failure."""
        return key in self._joinable or key in self._failures

    def join(
        self, key: str, *, request_id: str, arrived_at: float, resume_after: int = 0
    ) -> Subscription | None:
        """Only join: the live stream for ``key`` (or its remembered failure)
        from ``resume_after``, or None when there is none. Never starts a
        stream; for readers that are not requests of their own (another
        process relaying this log), so it counts as neither leader nor follower."""
        if self._closed:
            raise RegistryClosed("the registry is closed")
        actor = self._joinable.get(key)
        if actor is None:
            remembered = self._failures.get(key)
            if remembered is None:
                return None
            actor = StreamActor.remembered(
                key=key, stream_id=remembered.stream_id, failure=remembered.failure, clock=self._clock
            )
            resume_after = 0
        return self._attach(actor, "follower", request_id, arrived_at, resume_after, count=False)

    def relayed(self, stream_id: int) -> bool:
        """Whether that running stream relays another process's log."""
        return stream_id in self._relays

    def cancel(self, request_id: str, *, owner: str | None = None) -> bool:
        """Explicit cancel: that subscription ends and leaves. False if
        unknown -- or owned by someone else, which looks the same, so the
        answer does not tell whether another client's request exists."""
        subscription = self._by_request.get(request_id)
        if subscription is None or subscription.owner not in (None, owner):
            return False
        subscription.close()
        return True

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            actors=len(self._running),
            subscribers=self._open_subscriptions,
            errors_cached=len(self._failures),
            replay_bytes=sum(actor.replay_bytes for actor in self._running.values()),
            leaders_total=self._leaders_total,
            followers_total=self._followers_total,
            errors_replayed_total=self._errors_replayed_total,
            abandoned_total=self._abandoned_total,
            resets_total=self._resets_total,
            upstream_calls_total=self._upstream_calls_total,
        )

    # -- lifetime ------------------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Until no actor task is left (a graceful drain waits on this)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def aclose(self, reason: BaseException | None = None) -> None:
        """End every live stream with ``reason`` (default ``RegistryClosed``),
        reset every open source, forget remembered failures, and await every
        actor task. Idempotent."""
        self._closed = True
        if reason is None:
            reason = RegistryClosed("the gateway is shutting down")
        for remembered in self._failures.values():
            remembered.expiry.cancel()
        self._failures.clear()
        for actor in list(self._running.values()):
            actor.shutdown(reason)
        while self._tasks:
            # Each task ends by cancellation (or is already done); its result
            # holds nothing we need, and a failure was delivered as data.
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals -----------------------------------------------------------------------

    def _lead(
        self, key: str, open_source: OpenSource, request_id: str, arrived_at: float, shared: bool
    ) -> Subscription:
        asyncio.get_running_loop()  # fail before taking a ticket, not after
        ticket = self._admission.enqueue(arrived_at)  # QueueFull propagates from here
        actor = self._new_actor(key, shared)
        subscription = self._attach(actor, "leader", request_id, arrived_at, 0)
        if shared:
            # Replaces an actor past its replay budget, which lives on privately.
            self._joinable[key] = actor
        self._run(actor, open_source, ticket)
        return subscription

    def _start_relay(
        self, key: str, relay: OpenRelay, request_id: str, arrived_at: float, cursor: int
    ) -> Subscription:
        asyncio.get_running_loop()
        actor = self._new_actor(key, shared=True)
        subscription = self._attach(actor, "follower", request_id, arrived_at, cursor)
        self._joinable[key] = actor
        self._relays.add(actor.stream_id)
        self._run(actor, relay, None)
        return subscription

    def _new_actor(self, key: str, shared: bool) -> StreamActor:
        return StreamActor(
            key=key,
            stream_id=next(self._stream_ids),
            max_replay_bytes=self._max_replay_bytes,
            observer=self._on_actor_event,
            clock=self._clock,
            shared=shared,
            lag=self._lag,
        )

    def _run(self, actor: StreamActor, open_source: OpenSource, ticket: Ticket | None) -> None:
        """Start the actor's task, owned here until it ends."""
        self._running[actor.stream_id] = actor
        task = actor.start(open_source, ticket)
        self._tasks.add(task)
        task.add_done_callback(self._discard_task, context=self._callback_context)

    def _attach(
        self,
        actor: StreamActor,
        role: Role,
        request_id: str,
        arrived_at: float,
        cursor: int,
        *,
        count: bool = True,
    ) -> Subscription:
        if request_id in self._by_request:
            # An id another open subscription holds (a proxy-supplied one,
            # reused): ids must name one request, or a cancel by id would
            # end the wrong one. This one takes a fresh id (its
            # ``request_id`` says which), in the same tick as the check.
            request_id = secrets.token_hex(12)
        subscription = Subscription(
            actor=actor,
            request_id=request_id,
            role=role,
            arrived_at=arrived_at,
            cursor=cursor,
            on_close=self._forget_subscription,
        )
        actor.join(subscription)
        self._by_request[request_id] = subscription
        self._open_subscriptions += 1
        if count and role == "leader":
            self._leaders_total += 1
        elif count:
            self._followers_total += 1
        return subscription

    def _forget_subscription(self, subscription: Subscription) -> None:
        self._open_subscriptions -= 1
        if self._by_request.get(subscription.request_id) is subscription:
            del self._by_request[subscription.request_id]

    def _on_actor_event(self, event: ActorEvent) -> None:
        self._handle(event)
        if self._observer is not None:
            self._observer(event)

    def _handle(self, event: ActorEvent) -> None:
        match event:
            case UpstreamOpening(stream_id=stream_id):
                if stream_id not in self._relays:
                    self._upstream_calls_total += 1
            case JoinersClosed(stream_id=stream_id, key=key):
                self._unlist(key, stream_id)
            case StreamEnded(stream_id=stream_id, key=key, end=end, reset_s=reset_s):
                self._unlist(key, stream_id)
                actor = self._running.pop(stream_id, None)
                relayed = stream_id in self._relays
                self._relays.discard(stream_id)
                if relayed:
                    # Not an upstream stream: its owner counts the reset.
                    reset_s = None
                if reset_s is not None:
                    self._resets_total += 1
                if isinstance(end, Abandoned):
                    self._abandoned_total += 1
                    if reset_s is not None and self._on_reset is not None:
                        self._on_reset(reset_s)
                elif isinstance(end, Failed) and actor is not None and not relayed:
                    if self._on_failure is not None:
                        self._on_failure(end.error, actor.subscriber_count)
                    if actor.shared:
                        self._remember(key, stream_id, end)
                if self._on_stream_end is not None:
                    self._on_stream_end(event)

    def _unlist(self, key: str, stream_id: int) -> None:
        actor = self._joinable.get(key)
        if actor is not None and actor.stream_id == stream_id:
            del self._joinable[key]

    def _remember(self, key: str, stream_id: int, failure: Failed) -> None:
        if self._closed or self._error_ttl_s <= 0 or not self._remember_failure(failure.error):
            return
        if key in self._joinable:
            # A newer stream (this one went past its replay budget) answers
            # identical requests: the older call's failure must not answer
            # them after it, nor beside it.
            return
        previous = self._failures.pop(key, None)
        if previous is not None:
            previous.expiry.cancel()
        expiry = asyncio.get_running_loop().call_later(
            self._error_ttl_s, self._forget_failure, key, stream_id
        )
        self._failures[key] = _RememberedFailure(stream_id, failure, expiry)

    def _forget_failure(self, key: str, stream_id: int) -> None:
        remembered = self._failures.get(key)
        if remembered is not None and remembered.stream_id == stream_id:
            del self._failures[key]
