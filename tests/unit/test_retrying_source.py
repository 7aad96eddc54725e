"""RetryingSource against scripted upstream streams (bytes in, as the wire
would bring them): what is held back, when an attempt ends, what is retried."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission import AdmissionQueue
from gateway.errors import GatewayError, QueueTimeout, UpstreamConnectionLost, UpstreamTimeout
from gateway.routing.breaker import CircuitBreaker, CircuitState
from gateway.routing.config import RetryConfig, RoutingConfig, UpstreamConfig
from gateway.routing.failures import classify
from gateway.routing.retrying import RetryingSource
from gateway.routing.router import Router, Upstream
from gateway.upstream.base import ResponseHead, ResponseStream, Transport, UpstreamRequest
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.errors import StreamReset
from gateway.upstream.providers import OpenAIProvider
from gateway.upstream.source import SourceTimeouts

TIMEOUTS = SourceTimeouts(first_token_s=60.0, idle_s=30.0)


def chunk(finish: str | None = None, **delta: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ScriptedStream:
    """One response: a head (200 unless the script starts with a status),
    then these reads (an exception is raised)."""

    def __init__(self, reads: Sequence[bytes | Exception | int]) -> None:
        self._status = reads[0] if reads and isinstance(reads[0], int) else 200
        self._reads = [r for r in reads if not isinstance(r, int)]
        self.ended: str | None = None

    async def head(self) -> ResponseHead:
        await asyncio.sleep(0)
        content_type = "text/event-stream" if self._status == 200 else "application/json"
        return ResponseHead(self._status, (("content-type", content_type),), "HTTP/2")

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        item = self._reads.pop(0) if self._reads else b""
        if isinstance(item, Exception):
            raise item
        return item

    def reset(self) -> None:
        self.ended = self.ended or "reset"

    def release(self) -> None:
        self.ended = self.ended or "released"


class ScriptedTransport:
    def __init__(self, *responses: Sequence[bytes | Exception | int]) -> None:
        self._responses = list(responses)
        self.streams: list[ScriptedStream] = []

    async def open(self, request: UpstreamRequest) -> ResponseStream:
        stream = ScriptedStream(self._responses.pop(0))
        self.streams.append(stream)
        return stream

    def connection_count(self) -> int:
        return 0

    async def aclose(self) -> None:
        pass


def router_of(transport: Transport, attempts: int = 2) -> tuple[Router, Upstream]:
    config = UpstreamConfig(name="only", url="http://upstream/v1")
    upstream = Upstream(config=config, transport=transport, provider=OpenAIProvider(),
                        base_path="/v1", public_url=config.url,
                        breaker=CircuitBreaker(failures=1000, cooldown_s=10))
    routing = RoutingConfig((config,), RetryConfig(max_attempts=attempts, retry_budget_min=1000),
                            from_file=True)
    return Router(routing, [upstream]), upstream


async def read_all(transport: ScriptedTransport) -> tuple[str, Upstream]:
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    text = "".join([delta.text async for delta in source])
    return text, upstream


async def test_an_answer_whose_first_token_and_end_share_a_read_ends_its_attempt() -> None:
    transport = ScriptedTransport([chunk(role="assistant") + chunk(content="Hi") + DONE])
    text, upstream = await read_all(transport)
    assert text == "Hi"
    assert transport.streams[0].ended == "released"
    assert upstream.in_flight == 0


async def test_what_came_before_the_first_token_of_a_failed_attempt_is_dropped() -> None:
    transport = ScriptedTransport(
        # A delta that is no content (a finish reason), then the connection goes.
        [chunk(finish="length"), UpstreamConnectionLost("gone")],
        [chunk(role="assistant"), chunk(content="A"), chunk(finish="stop", content="B"), DONE],
    )
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    deltas = [delta async for delta in source]
    # The second attempt's deltas only.
    assert [(d.text, d.finish_reason) for d in deltas] == [("A", None), ("B", "stop")]
    assert [s.ended for s in transport.streams] == ["reset", "released"]
    assert upstream.in_flight == 0


async def test_a_failure_after_the_first_token_is_raised_not_retried() -> None:
    transport = ScriptedTransport(
        [chunk(content="A"), UpstreamConnectionLost("gone")],
        [chunk(content="never"), DONE],
    )
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    seen = []
    with pytest.raises(UpstreamConnectionLost):
        async for delta in source:
            seen.append(delta.text)
    assert seen == ["A"] and len(transport.streams) == 1
    assert upstream.in_flight == 0


async def test_a_reset_from_the_actor_ends_the_attempt_once() -> None:
    transport = ScriptedTransport([chunk(content="A"), chunk(content="B"), DONE])
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    assert (await source.__anext__()).text == "A"
    source.reset()
    source.reset()
    assert upstream.in_flight == 0 and transport.streams[0].ended == "reset"


async def test_an_unexpected_error_before_the_first_token_ends_the_attempt() -> None:
    transport = ScriptedTransport([chunk(finish="stop"), RuntimeError("a bug")], [DONE])
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    with pytest.raises(RuntimeError):
        await source.__anext__()
    assert upstream.in_flight == 0 and len(transport.streams) == 1


# -- every script of attempts ------------------------------------------------------------

ERROR_BODY = json.dumps({"error": {"message": "busy", "type": "server_error"}}).encode()

#: How an attempt goes: fails before content (and how), or answers k tokens and
#: then ends or breaks.
attempts_strategy = st.lists(
    st.one_of(
        st.sampled_from(["lost", "503", "400"]).map(lambda how: ("fail", how, 0)),
        st.tuples(st.just("answer"), st.sampled_from(["done", "lost"]),
                  st.integers(min_value=1, max_value=4)),
    ),
    min_size=1,
    max_size=5,
)


def script(attempt: tuple[str, str, int], n: int) -> list[bytes | Exception | int]:
    what, how, tokens = attempt
    if what == "fail":
        if how == "lost":
            return [chunk(finish="x"), UpstreamConnectionLost("gone")]
        return [int(how), ERROR_BODY]
    reads: list[bytes | Exception | int] = [chunk(content=f"{n}.{i} ") for i in range(tokens)]
    reads.append(DONE if how == "done" else UpstreamConnectionLost("gone"))
    return reads


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attempts=attempts_strategy, max_attempts=st.integers(min_value=1, max_value=4),
       cancel_after=st.one_of(st.none(), st.integers(min_value=0, max_value=3)))
def test_one_answer_only_and_every_attempt_ends(
    attempts: list[tuple[str, str, int]], max_attempts: int, cancel_after: int | None
) -> None:
    """Whatever the attempts do: the deltas are those of one attempt alone,
    no attempt is opened past max_attempts or after a failure that is not
    retried, and every attempt ends (in-flight back to 0)."""

    async def run() -> None:
        transport = ScriptedTransport(*(script(a, n) for n, a in enumerate(attempts)))
        router, upstream = router_of(transport, max_attempts)
        plan = router.plan({"model": "m", "messages": []}, "m")
        source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
        texts: list[str] = []
        error: Exception | None = None
        try:
            await source.start()
            async for delta in source:
                texts.append(delta.text)
                if cancel_after is not None and len(texts) > cancel_after:
                    source.reset()
                    break
        except Exception as exc:  # the failure the actor would share
            error = exc
        # Which attempt answered (if any) and which one was the last opened.
        opened = len(transport.streams)
        assert 1 <= opened <= max_attempts
        for n, attempt in enumerate(attempts[: opened - 1]):
            assert attempt[0] == "fail" and attempt[1] != "400", (n, attempts)
        last = attempts[opened - 1]
        if texts:
            assert last[0] == "answer"
            assert all(t.startswith(f"{opened - 1}.") for t in texts if t)
        if last[0] == "fail":
            assert error is not None and not texts
        elif cancel_after is None:
            assert len([t for t in texts if t]) == last[2]
            assert (error is None) == (last[1] == "done")
        assert upstream.in_flight == 0

    asyncio.run(run())


def _one_upstream_breaking_at_once(
    transport: ScriptedTransport, now: list[float]
) -> tuple[Upstream, CircuitBreaker, Router]:
    """One upstream whose circuit opens at its first failure for 10 s, one
    attempt a request, the router's clock ``now[0]``."""
    config = UpstreamConfig(name="only", url="http://upstream/v1")
    breaker = CircuitBreaker(failures=1, cooldown_s=10)
    upstream = Upstream(config=config, transport=transport, provider=OpenAIProvider(),
                        base_path="/v1", public_url=config.url, breaker=breaker)
    routing = RoutingConfig((config,), RetryConfig(max_attempts=1, retry_budget_min=1000),
                            from_file=True)
    return upstream, breaker, Router(routing, [upstream], clock=lambda: now[0])


async def test_an_attempt_without_the_probe_does_not_hand_the_probe_back() -> None:
    """A half-open circuit's probe is out with another request; in panic
    mode this attempt goes anyway, gets a 400 (the request's fault, which
    tells nothing of the upstream), and must leave the probe taken: one
    probe at a time."""
    now = [0.0]
    transport = ScriptedTransport([400, b'{"error": {"message": "bad", "type": "x"}}'])
    upstream, breaker, router = _one_upstream_breaking_at_once(transport, now)
    breaker.failure(0.0)  # open until 10
    now[0] = 11.0
    assert breaker.acquire(11.0)  # another request took the probe
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    with pytest.raises(GatewayError):
        await source.start()
        async for _ in source:
            pass
    assert upstream.in_flight == 0
    assert not breaker.available(11.0)  # the other request still holds the probe


async def test_a_probe_of_an_earlier_half_open_does_not_hand_back_a_later_probe() -> None:
    """Attempt A takes the probe of a half-open circuit. Meanwhile another
    attempt (panic mode) fails there: the circuit opens again, and after
    its cooldown attempt C takes the new probe. A's client leaves then: A's
    probe is no longer the one out, so the circuit must stay with one probe
    (C's), not let a third request through as a probe too."""
    now = [0.0]
    answer = [chunk(content="A"), DONE]
    transport = ScriptedTransport(answer, [503, b'{"error": {"message": "down", "type": "x"}}'],
                                  answer)
    upstream, breaker, router = _one_upstream_breaking_at_once(transport, now)
    plan = router.plan({"model": "m", "messages": []}, "m")

    def source() -> RetryingSource:
        return RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())

    breaker.failure(0.0)  # open until 10
    now[0] = 10.0
    first = source()
    await first.start()  # the probe
    assert not breaker.available(10.0)
    with pytest.raises(GatewayError):  # panic mode: goes anyway, and fails
        failing = source()
        await failing.start()
        async for _ in failing:
            pass
    now[0] = 20.0
    later = source()
    await later.start()  # the next half-open's probe
    first.reset()  # its client left
    assert not breaker.available(20.0)
    assert [delta.text async for delta in later] == ["A"]
    assert breaker.state(20.0) is CircuitState.CLOSED and upstream.in_flight == 0


async def test_the_wait_for_an_upstream_slot_ends_at_the_first_token_deadline() -> None:
    """The first-token timeout counts from the request's first attempt; a
    wait for the upstream's admission slot is part of it. When the slot
    does not come in time the attempt fails then, not after the queue's own,
    longer timeout, and leaves the queue. It fails as a wait for our own
    limit does (503, ``busy``): the upstream never saw the request, so its
    circuit does not count it."""
    transport = ScriptedTransport([chunk(content="never"), DONE])
    router, upstream = router_of(transport, attempts=1)
    upstream.admission = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=60.0)
    upstream.breaker = CircuitBreaker(failures=1, cooldown_s=10)  # one upstream failure opens it
    occupant = upstream.admission.enqueue(time.monotonic())  # holds the only slot
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(first_token_s=0.05, idle_s=30.0),
                            deadlines=Deadlines())
    async with asyncio.timeout(10):  # the queue's own timeout would be 60 s
        with pytest.raises(QueueTimeout, match="first-token timeout") as failed:
            await source.start()
    assert classify(failed.value).kind == "busy" and failed.value.status == 503
    assert upstream.breaker.state(time.monotonic()) is CircuitState.CLOSED
    assert upstream.admission.depth == 0 and upstream.admission.inflight == 1
    assert transport.streams == [] and upstream.in_flight == 0
    occupant.release()
    assert upstream.admission.inflight == 0


class SilentStream:
    """A 200 whose body never comes: a read waits until the stream is reset
    (the source's first-token watchdog does that), then fails as a reset
    stream does."""

    def __init__(self) -> None:
        self._reset = asyncio.Event()

    async def head(self) -> ResponseHead:
        return ResponseHead(200, (("content-type", "text/event-stream"),), "HTTP/2")

    async def read(self) -> bytes:
        await self._reset.wait()
        raise StreamReset("reset")

    def reset(self) -> None:
        self._reset.set()

    def release(self) -> None:
        self._reset.set()


class SilentTransport(ScriptedTransport):
    """Every stream it opens is a ``SilentStream``."""

    async def open(self, request: UpstreamRequest) -> ResponseStream:
        stream = SilentStream()
        self.streams.append(stream)  # type: ignore[arg-type]
        return stream


async def test_the_first_attempt_after_a_wait_for_a_slot_ends_at_the_first_token_deadline() -> None:
    """The slot comes free before the deadline, the upstream then sends
    nothing: the attempt ends at the request's first-token deadline, counted
    from before the wait, not a whole first-token timeout after the slot."""
    transport = SilentTransport()
    router, upstream = router_of(transport, attempts=1)
    upstream.admission = AdmissionQueue(max_inflight=1, max_queue=10, queue_timeout_s=60.0)
    occupant = upstream.admission.enqueue(time.monotonic())  # holds the only slot
    loop = asyncio.get_running_loop()
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(first_token_s=1.0, idle_s=30.0),
                            deadlines=Deadlines())
    started = loop.time()
    loop.call_later(0.8, occupant.release)  # the scenario: the slot frees late
    async with asyncio.timeout(10):
        await source.start()
        with pytest.raises(UpstreamTimeout, match="no first token"):
            await anext(source)
    # The deadline is 1.0 s; a whole timeout after the slot would be 1.8 s.
    assert loop.time() - started < 1.5
    assert len(transport.streams) == 1 and upstream.in_flight == 0
    assert upstream.admission.inflight == 0


def refused(status: int) -> list[bytes | Exception | int]:
    return [status, b'{"error": {"message": "no", "type": "x"}}']


def answer(text: str) -> list[bytes | Exception | int]:
    return [chunk(content=text), chunk(finish="stop"), DONE]


async def answered_by(*scripts: Sequence[Sequence[bytes | Exception | int]],
                      attempts: int) -> tuple[str, list[ScriptedTransport]]:
    """One request over upstreams tried in this order (by priority, then all
    again in the same order), each answering its script's responses in turn."""
    transports = [ScriptedTransport(*responses) for responses in scripts]
    configs = [UpstreamConfig(name=f"u{n}", url=f"http://u{n}/v1", priority=n)
               for n in range(len(scripts))]
    upstreams = [Upstream(config=config, transport=transport, provider=OpenAIProvider(),
                          base_path="/v1", public_url=config.url,
                          breaker=CircuitBreaker(failures=1000, cooldown_s=10))
                 for config, transport in zip(configs, transports, strict=True)]
    routing = RoutingConfig(tuple(configs),
                            RetryConfig(max_attempts=attempts, retry_budget_min=1000),
                            from_file=True)
    router = Router(routing, upstreams)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=TIMEOUTS, deadlines=Deadlines())
    await source.start()
    text = "".join([delta.text async for delta in source])
    return text, transports


async def test_an_upstream_that_refused_our_key_is_not_tried_again_after_other_failures() -> None:
    """u0 refuses our key, u1 and u2 fail with a 500: the fourth attempt,
    once every upstream was tried, goes to u1 again, never to u0."""
    text, transports = await answered_by(
        [refused(401)], [refused(500), answer("from u1")], [refused(500)], attempts=4
    )
    assert text == "from u1"
    assert [len(t.streams) for t in transports] == [1, 2, 1]


async def test_an_upstream_that_only_failed_is_tried_again_after_another_refused_our_key() -> None:
    """u0 fails with a 500 and u1 refuses our key: u0 may take the retry."""
    text, transports = await answered_by(
        [refused(500), answer("from u0")], [refused(403)], attempts=3
    )
    assert text == "from u0"
    assert [len(t.streams) for t in transports] == [2, 1]


async def test_a_request_whose_every_upstream_refused_our_key_ends_with_that_failure() -> None:
    """Attempts left, but no upstream that has not refused our key."""
    with pytest.raises(GatewayError) as failed:
        await answered_by([refused(401)], [refused(401)], attempts=4)
    assert failed.value.code == "upstream_auth_error"
