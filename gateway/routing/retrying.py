"""A Source that retries and falls back until its first token.

The actor calls ``open_source()`` once and iterates what it gets
(``actors.ports.Source``); this wrapper is that source. Until the first
content delta nothing has reached any client (they have seen pings only),
so a failure there may be answered by another attempt: the next candidate
(``Router.next_upstream``), or the same upstream when it is the only one.
What an attempt decoded before its first token (no content: a usage or a
finish record) is held back and dropped with the attempt, so the actor's
log holds one answer only.
From the first token on, deltas pass straight through and a failure is the
stream's failure: a second generation would be a different answer.

Because the retry happens inside the one source of one actor, a coalesced
burst retries once for all its subscribers.

Bounds: ``max_attempts`` per request, the router's retry budget, and the
first-token deadline (UPSTREAM_FIRST_TOKEN_TIMEOUT_MS from the first
attempt); each attempt's own first-token wait is its upstream's
``first_token_timeout_ms`` within what is left of that deadline. Every wait
of every attempt, the first included, ends there: for the upstream's slot
(``max_inflight``), for the transport to open the stream (an HTTP/2 stream
slot, an HTTP/1.1 response head), for the first token. A 429's
Retry-After is waited for only when no other upstream can take the retry
and it ends within the deadline and ``max_retry_after_ms``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

import structlog

from actors.deltas import Delta
from gateway.admission import AdmissionTicket
from gateway.errors import GatewayError, QueueTimeout, UpstreamProtocolError
from gateway.routing.breaker import CircuitState
from gateway.routing.failures import Failure, classify
from gateway.routing.router import RoutePlan, Router, Upstream
from gateway.upstream.base import ResponseHead, ResponseStream, Transport, UpstreamRequest
from gateway.upstream.deadlines import RESOLUTION, Deadlines
from gateway.upstream.errors import TransportTimeout
from gateway.upstream.source import SourceTimeouts, UpstreamSource, source_opener

log = structlog.get_logger("gateway.routing")

#: Records without content (usage, a finish) an attempt may decode before
#: its first token. A model's answer has a handful at most (a finish and a
#: usage for max_tokens=0); an upstream sending more is not answering, and
#: each one held would stay in memory until the first-token deadline.
MAX_HELD_DELTAS = 64
#: The least of the first-token deadline a retry or fallback starts with.
#: Below it no model sends a first token (a request's round trip and the
#: prompt's prefill take longer), and the prompt sent would be billed work
#: for nothing: the request fails with what its last attempt got instead.
MIN_ATTEMPT_S = 0.1


class AttemptObserver(Protocol):
    """Who follows the upstream call (the exchange log's ``Call``): told of
    each attempt (what an earlier one decoded is not the answer), then
    shown each read's deltas as decoded."""

    def attempt(self, upstream: str) -> None: ...

    def __call__(self, deltas: Sequence[Delta]) -> None: ...


class RetryingSource:
    """``actors.ports.Source`` over the attempts of one request's route plan."""

    __slots__ = (
        "_router",
        "_plan",
        "_timeouts",
        "_deadlines",
        "_deadline",
        "_inner",
        "_upstream",
        "_ticket",
        "_tried",
        "_refused",
        "_attempt_started",
        "_held",
        "_flowing",
        "_reset",
        "_transport",
        "_attempt",
        "_released",
        "_observer",
        "_probe",
        "_to_deadline",
        "__weakref__",
    )

    def __init__(
        self,
        router: Router,
        plan: RoutePlan,
        *,
        timeouts: SourceTimeouts,
        deadlines: Deadlines,
        observer: AttemptObserver | None = None,
    ) -> None:
        self._router = router
        self._plan: RoutePlan | None = plan
        self._timeouts = timeouts
        self._deadlines = deadlines
        self._deadline: float | None = None
        self._inner: UpstreamSource | None = None
        self._upstream: Upstream | None = None
        self._ticket: AdmissionTicket | None = None
        #: The attempts' upstreams so far; let go at the first token.
        self._tried: tuple[Upstream, ...] = ()
        #: The upstreams that refused our key (401, 403): with the same key
        #: they would refuse it again, so no later attempt goes to them.
        self._refused: tuple[Upstream, ...] = ()
        self._attempt_started = 0.0
        #: Deltas of the current attempt before its first token (a list
        #: only while there are some: every open stream holds this slot).
        self._held: list[Delta] | None = None
        self._flowing = False
        self._reset = False
        #: The current attempt's upstream transport (see ``open``), its
        #: number, and whether its answer was complete before its first
        #: token was handed out (released in the read that carried both).
        self._transport: Transport | None = None
        self._attempt = 0
        self._released = False
        self._observer = observer
        #: The opening of its upstream's circuit whose half-open probe this
        #: attempt holds (``CircuitBreaker.openings``); None: no probe.
        self._probe: int | None = None
        #: This attempt waits up to the request's first-token deadline (not a
        #: shorter timeout of its upstream's): its timeout is the deadline's.
        self._to_deadline = False

    # -- actors.ports.Source -------------------------------------------------------

    async def start(self) -> None:
        """The first attempt that opens (open failures move on at once)."""
        router = self._router
        router.budget.request(router.clock())
        first = self._timeouts.first_token_s
        self._deadline = None if first is None else router.clock() + first
        await self._open_next(None)

    def __aiter__(self) -> RetryingSource:
        return self

    def __anext__(self) -> Awaitable[Delta]:
        """Before the first token, our own loop; after it, the attempt's own
        read, handed to the actor as it is: an idle stream waits through no
        frame of ours (each is ~230 bytes per open stream). Its end reaches
        us through the response stream (``_TrackedStream``)."""
        if not self._flowing:
            return self._until_first_token()
        if self._held is not None:
            return self._pop_held()
        assert self._inner is not None
        return self._inner.__anext__()

    async def _pop_held(self) -> Delta:
        held = self._held
        assert held is not None
        delta = held.pop(0)
        if not held:
            self._held = None
        return delta

    async def _until_first_token(self) -> Delta:
        while True:
            inner = self._inner
            assert inner is not None, "start() first"
            try:
                delta = await inner.__anext__()
            except StopAsyncIteration:
                # An answer without content (max_tokens=0): complete as it is.
                self._attempt_ended(None)
                self._flowing = True
                if self._held is not None:
                    return await self._pop_held()
                raise
            except Exception as exc:
                await self._attempt_failed(exc)
                continue
            if not delta.is_content:
                if self._held is None:
                    self._held = []
                if len(self._held) >= MAX_HELD_DELTAS:
                    # No model answers with this many records before its
                    # first token: the stream is malformed, and holding
                    # more would grow without bound until the deadline.
                    inner.reset()
                    await self._attempt_failed(UpstreamProtocolError(
                        f"upstream sent {MAX_HELD_DELTAS} records without content"
                        " before its first token"))
                    continue
                self._held.append(delta)
                continue
            self._first_token()
            if self._held is not None:
                self._held.append(delta)
                return await self._pop_held()
            return delta

    async def _attempt_failed(self, exc: Exception) -> None:
        """The attempt's failure before its first token: what it decoded is
        dropped, and the next attempt opened, or ``exc`` raised."""
        failure = classify(exc)
        self._attempt_ended(failure)
        self._held = None
        if not isinstance(exc, GatewayError):
            raise exc  # not the upstream's failure: nothing to retry
        await self._open_next((exc, failure))

    def reset(self) -> None:
        self._reset = True
        self._plan = None
        if self._inner is not None:
            self._inner.reset()
        self._attempt_ended(None, cancelled=True)

    # -- attempts ----------------------------------------------------------------------

    async def _open_next(self, failed: tuple[GatewayError, Failure] | None) -> None:
        """Open attempts until one is on the wire; re-raises the last failure
        when no retry is left."""
        router = self._router
        while True:
            if failed is not None:
                exc, failure = failed
                if failure.kind == "auth":
                    self._refused = (*self._refused, self._tried[-1])
                wait = self._may_retry(failure)
                if wait is None:
                    raise exc
                upstream, delay = wait
                failed_on = self._tried[-1].name
                router.observer.retry(failed_on, failure.kind)
                log.info("upstream retry", upstream=failed_on, reason=failure.kind,
                         status=failure.status, next=upstream.name,
                         delay_ms=round(delay * 1000), attempt=len(self._tried) + 1)
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                assert self._plan is not None
                upstream = router.next_upstream(self._plan.candidates, self._tried)
            try:
                await self._open(upstream)
                return
            except GatewayError as exc:
                failure = classify(exc)
                self._attempt_ended(failure)
                failed = (exc, failure)

    def _may_retry(self, failure: Failure) -> tuple[Upstream, float] | None:
        """The next attempt's upstream and how long to wait before it, or
        None: not retryable, out of attempts, budget or time."""
        router = self._router
        retry = router.retry
        plan = self._plan
        if self._reset or plan is None or not failure.retryable(retry.retry_statuses):
            return None
        if failure.kind in ("timeout", "busy") and self._to_deadline:
            # The request's deadline itself, whichever clock reads it as a
            # little short yet (the loop's may lag by a millisecond or more).
            return None
        if len(self._tried) >= retry.max_attempts:
            return None
        now = router.clock()
        if self._deadline is not None and now + MIN_ATTEMPT_S > self._deadline:
            return None
        candidates = [up for up in plan.candidates if up not in self._refused]
        if not candidates:
            return None  # every candidate refused our key
        upstream = router.next_upstream(candidates, self._tried)
        # A Retry-After is waited for by the retry of a 429 only; any other
        # retry goes at once, as a new request to a held-off upstream does.
        delay = max(0.0, upstream.hold_until - now) if failure.kind == "429" else 0.0
        if delay > 0:
            if delay * 1000 > retry.max_retry_after_ms:
                return None
            if self._deadline is not None and now + delay + MIN_ATTEMPT_S > self._deadline:
                return None
        if not router.budget.try_retry(now):
            return None
        return upstream, delay

    async def _open(self, upstream: Upstream) -> None:
        router = self._router
        plan = self._plan
        assert plan is not None
        if self._tried and upstream is not self._tried[-1]:
            router.observer.fallback(upstream.name)
        self._tried = (*self._tried, upstream)
        self._upstream = upstream
        self._attempt += 1
        self._released = False
        self._to_deadline = False
        upstream.in_flight += 1
        now = router.clock()
        half_open = upstream.breaker.state(now) is CircuitState.HALF_OPEN
        # Only the attempt that took a half-open circuit's probe may hand it
        # back unused; in panic mode an attempt goes without it.
        self._probe = (
            upstream.breaker.openings if upstream.breaker.acquire(now) and half_open else None
        )
        self._attempt_started = now
        try:
            if upstream.admission is not None:
                ticket = upstream.admission.enqueue(self._attempt_started)
                self._ticket = ticket
                await self._admitted(ticket)
            self._inner = await self._opener(upstream, plan)()
        except GatewayError:
            raise  # the caller ends the attempt with its failure
        except BaseException:
            self._attempt_ended(None, cancelled=True)
            raise

    async def _admitted(self, ticket: AdmissionTicket) -> None:
        """The upstream's slot, within what is left of the first-token
        deadline: a wait for a slot is time without a first token too. Past
        the deadline the attempt fails as the queue's own timeout does
        (``busy``: our limit, not the upstream's failure; cancelling the
        wait gives the slot back, or takes the ticket out of the queue)."""
        if self._deadline is None:
            await ticket.wait()
            return
        left = self._deadline - self._router.clock()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await ticket.wait()
        except TimeoutError as exc:
            self._to_deadline = True
            first = self._timeouts.first_token_s
            raise QueueTimeout(
                f"no upstream slot came free within the first-token timeout ({first:g} s)"
            ) from exc

    def _opener(self, upstream: Upstream, plan: RoutePlan) -> Callable[[], Awaitable[UpstreamSource]]:
        first = self._timeouts.first_token_s
        left: float | None = None
        if self._deadline is not None:
            # What is left of the request's deadline: earlier attempts and
            # the wait for this upstream's slot took the rest. Nearly all of
            # it (no wait came first): the shared timeouts, rather than one
            # more object every open stream would hold.
            left = self._deadline - self._router.clock()
            if first is None or left < first - RESOLUTION:
                first = max(left, 0.001)
        first = upstream.config.first_token_s(first)
        self._to_deadline = left is not None and first is not None and first >= left - RESOLUTION
        timeouts = self._timeouts
        if first != timeouts.first_token_s:
            timeouts = SourceTimeouts(first_token_s=first, idle_s=timeouts.idle_s)
        self._transport = upstream.transport
        if self._observer is not None:
            self._observer.attempt(upstream.name)
        return source_opener(
            self,
            upstream.provider,
            plan.request_for(upstream),
            timeouts=timeouts,
            deadlines=self._deadlines,
            on_status=upstream.on_status,
            on_deltas=self._observer,
        )

    # -- the transport its attempt's source sees ---------------------------------------

    async def open(self, request: UpstreamRequest) -> ResponseStream:
        """The upstream's transport, its streams tracked: their end after the
        first token is the attempt's end (``_stream_closed``). Opening ends
        at the first-token deadline too: the transport bounds its own waits
        (a stream slot, a response head) by a whole first-token timeout, and
        the source's deadline is checked only once the stream is open."""
        transport = self._transport
        assert transport is not None
        if self._deadline is None:
            stream = await transport.open(request)
        else:
            deadline = asyncio.timeout(max(self._deadline - self._router.clock(), 0.0))
            try:
                async with deadline:
                    stream = await transport.open(request)
            except TimeoutError as exc:
                if not deadline.expired():
                    raise  # the transport's own, not this deadline
                self._to_deadline = True
                raise TransportTimeout(
                    "upstream sent no first token within the first-token timeout"
                ) from exc
        return _TrackedStream(stream, self, self._attempt)

    def connection_count(self) -> int:
        return 0 if self._transport is None else self._transport.connection_count()

    async def aclose(self) -> None:
        """The upstream's transport belongs to the router, not to one request."""

    def _stream_closed(self, reset: bool, attempt: int) -> None:
        """The attempt's response stream was released (its answer complete)
        or reset. Before the first token the iteration itself ends the
        attempt, with what it learnt (a release is noted for the first
        token); after it, this is the end: a reset we did not ask for is
        the stream's failure."""
        if attempt != self._attempt:
            return
        if not self._flowing:
            self._released = not reset
            return
        failure = AFTER_FIRST_TOKEN if reset and not self._reset else None
        self._attempt_ended(failure, cancelled=self._reset)

    def _first_token(self) -> None:
        self._flowing = True
        # The prompts of every candidate, the attempts and the deadline of
        # the first token: not needed any more.
        self._plan = None
        self._tried = self._refused = ()
        upstream = self._upstream
        assert upstream is not None
        upstream.answered()
        router = self._router
        router.observer.upstream_ttft(upstream.name, router.clock() - self._attempt_started)
        # Two floats every open stream would hold for nothing (the constant
        # 0.0 and None are shared).
        self._attempt_started = 0.0
        self._deadline = None
        if self._released:
            self._attempt_ended(None)

    def _attempt_ended(self, failure: Failure | None, *, cancelled: bool = False) -> None:
        """Once per attempt: its slot back, its outcome to the breaker."""
        upstream, self._upstream = self._upstream, None
        if upstream is None:
            return
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.release()
        upstream.in_flight -= 1
        router = self._router
        if failure is not None:
            router.observer.failure(upstream.name, failure.kind)
            if not failure.upstream_at_fault:
                self._release_probe(upstream)
                return
            now = router.clock()
            hold = None
            if failure.retry_after_s is not None:
                hold = upstream.hold_until = now + failure.retry_after_s
            upstream.breaker.failure(now, hold_until=hold)
        elif cancelled and not self._flowing:
            self._release_probe(upstream)  # it told nothing
        elif not self._flowing:
            upstream.answered()

    def _release_probe(self, upstream: Upstream) -> None:
        if self._probe is not None:
            upstream.breaker.release(self._probe)
            self._probe = None


def retrying_opener(
    router: Router,
    plan: RoutePlan,
    *,
    timeouts: SourceTimeouts,
    deadlines: Deadlines,
    observer: AttemptObserver | None = None,
) -> Callable[[], Awaitable[RetryingSource]]:
    """The ``open_source`` callable the registry's actor calls after admission."""

    async def open_source() -> RetryingSource:
        source = RetryingSource(
            router, plan, timeouts=timeouts, deadlines=deadlines, observer=observer
        )
        await source.start()
        return source

    return open_source


#: A stream that failed after its first token (not retried; the source
#: raised the error itself).
AFTER_FIRST_TOKEN = Failure("after_first_token")


class _TrackedStream:
    """A response stream that reports its release or reset, once."""

    __slots__ = ("_stream", "_owner", "_attempt")

    def __init__(self, stream: ResponseStream, owner: RetryingSource, attempt: int) -> None:
        self._stream = stream
        self._owner: RetryingSource | None = owner
        self._attempt = attempt

    async def head(self) -> ResponseHead:
        return await self._stream.head()

    def read(self) -> Coroutine[Any, Any, bytes]:
        # The inner stream's own read, handed on: no coroutine frame of ours
        # for every idle stream to hold, and as safe to cancel as it is.
        return self._stream.read()

    def reset(self) -> None:
        self._stream.reset()
        self._closed(True)

    def release(self) -> None:
        self._stream.release()
        self._closed(False)

    def _closed(self, reset: bool) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._stream_closed(reset, self._attempt)
