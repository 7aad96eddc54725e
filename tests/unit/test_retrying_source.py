"""RetryingSource against scripted upstream streams (bytes in, as the wire
would bring them): what is held back, when an attempt ends, what is retried."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from gateway.errors import UpstreamConnectionLost
from gateway.routing.breaker import CircuitBreaker
from gateway.routing.config import RetryConfig, RoutingConfig, UpstreamConfig
from gateway.routing.retrying import RetryingSource
from gateway.routing.router import Router, Upstream
from gateway.upstream.base import ResponseHead, ResponseStream, UpstreamRequest
from gateway.upstream.providers import OpenAIProvider
from gateway.upstream.source import SourceTimeouts


def chunk(finish: str | None = None, **delta: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class ScriptedStream:
    """One response: a 200 head, then these reads (an exception is raised)."""

    def __init__(self, reads: Sequence[bytes | Exception]) -> None:
        self._reads = list(reads)
        self.ended: str | None = None

    async def head(self) -> ResponseHead:
        return ResponseHead(200, (("content-type", "text/event-stream"),), "HTTP/2")

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
    def __init__(self, *responses: Sequence[bytes | Exception]) -> None:
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


def router_of(transport: ScriptedTransport) -> tuple[Router, Upstream]:
    config = UpstreamConfig(name="only", url="http://upstream/v1")
    upstream = Upstream(config=config, transport=transport, provider=OpenAIProvider(),
                        base_path="/v1", public_url=config.url,
                        breaker=CircuitBreaker(failures=5, cooldown_s=10))
    routing = RoutingConfig((config,), RetryConfig(max_attempts=2), from_file=True)
    return Router(routing, [upstream]), upstream


async def read_all(transport: ScriptedTransport) -> tuple[str, Upstream]:
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "m")
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(), deadlines=None)
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
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(), deadlines=None)
    await source.start()
    deltas = [delta async for delta in source]
    # The second attempt's deltas only.
    assert [(d.text, d.finish_reason) for d in deltas] == [("A", None), ("B", "stop")]
    assert [s.ended for s in transport.streams] == ["reset", "released"]
    assert upstream.in_flight == 0 and source.served_by == "only"


async def test_a_failure_after_the_first_token_is_raised_not_retried() -> None:
    transport = ScriptedTransport(
        [chunk(content="A"), UpstreamConnectionLost("gone")],
        [chunk(content="never"), DONE],
    )
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(), deadlines=None)
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
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(), deadlines=None)
    await source.start()
    assert (await source.__anext__()).text == "A"
    source.reset()
    source.reset()
    assert upstream.in_flight == 0 and transport.streams[0].ended == "reset"


async def test_an_unexpected_error_before_the_first_token_ends_the_attempt() -> None:
    transport = ScriptedTransport([chunk(finish="stop"), RuntimeError("a bug")], [DONE])
    router, upstream = router_of(transport)
    plan = router.plan({"model": "m", "messages": []}, "m")
    source = RetryingSource(router, plan, timeouts=SourceTimeouts(), deadlines=None)
    await source.start()
    with pytest.raises(RuntimeError):
        await source.__anext__()
    assert upstream.in_flight == 0 and len(transport.streams) == 1
