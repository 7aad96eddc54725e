"""The recorder against a real registry and in-memory upstream: one record
per upstream call, its messages with and without content, its subscribers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from actors.deltas import Delta, StreamInfo, ToolCallDelta, Usage
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from gateway.errors import UpstreamStatusError
from gateway.exchanges.record import Exchange
from gateway.exchanges.recorder import Call, Recorder
from tests.unit.memory_source import MemoryUpstream, read_all

BODY = {
    "model": "m-1",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is in the picture"}]},
    ],
}
ANSWER = [
    Delta(reasoning="thinking"),
    Delta(text="It is "),
    Delta(text="a heron.", tool_calls=(ToolCallDelta(0, id="call_1", name="look", arguments='{"a"'),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments=":1}"),)),
    Delta(finish_reason="stop", usage=Usage(prompt_tokens=12, completion_tokens=5)),
]


class Harness:
    def __init__(self, keep_content: bool) -> None:
        self.exchanges: list[Exchange] = []
        self.tokens: list[tuple[str, str, int, int]] = []
        self.failed_records = 0
        self.recorder = Recorder(
            upstream="up-1", keep_content=keep_content, on_exchange=self.exchanges.append,
            tokens=lambda *counted: self.tokens.append(counted),
            record_failed=self._record_failed,
        )
        self.upstream = MemoryUpstream()
        self.registry = Registry(
            admission=AdmissionQueue(max_inflight=4, max_queue=4, queue_timeout_s=30),
            error_ttl_s=0.05,
            on_stream_end=self.recorder.stream_ended,
        )
        self.calls: dict[str, Call] = {}

    def _record_failed(self) -> None:
        self.failed_records += 1

    def subscribe(self, request_id: str, key_id: str | None = None,
                  body: dict[str, Any] = BODY) -> Subscription:
        call = self.recorder.call(body, str(body["model"]))
        call.bind(self.upstream.open)
        subscription = self.registry.subscribe(
            "key", call.open, request_id=request_id, arrived_at=0.0
        )
        self.recorder.joined(call, subscription, key_id)
        self.calls[request_id] = call
        return subscription


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    harness = Harness(getattr(request, "param", False))
    yield harness
    await harness.registry.aclose()
    assert harness.recorder.open_calls == 0


def _push(harness: Harness, leader: str, deltas: list[Delta]) -> None:
    """What the upstream source does: log the deltas, show them to the call."""
    harness.upstream.latest.push(*deltas)
    harness.calls[leader](deltas)


@pytest.mark.parametrize("harness", [True], indirect=True)
async def test_with_content_the_record_holds_the_whole_answer(harness: Harness):
    subscribers = [harness.subscribe(f"req-{i}", key_id=f"key-{i % 2}") for i in range(3)]
    await harness.upstream.next_source()
    _push(harness, "req-0", ANSWER)
    harness.upstream.latest.finish()
    for subscription in subscribers:
        async with subscription:
            await read_all(subscription)
    (exchange,) = harness.exchanges
    assert exchange.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": '[{"text":"what is in the picture","type":"text"}]'},
        {"role": "assistant", "content": "It is a heron.", "reasoning": "thinking",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "look", "arguments": '{"a":1}'}}]},
    )
    assert (exchange.outcome, exchange.finish_reason, exchange.error) == ("complete", "stop", None)
    assert exchange.request_ids == ("req-0", "req-1", "req-2")
    assert exchange.api_key_ids == ("key-0", "key-1")
    assert exchange.subscribers == 3
    assert (exchange.model, exchange.upstream) == ("m-1", "up-1")
    assert harness.tokens == [("m-1", "up-1", 12, 5)]


async def test_without_content_the_record_holds_no_text(harness: Harness):
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    _push(harness, "req-0", ANSWER)
    harness.upstream.latest.finish()
    async with subscription:
        await read_all(subscription)
    (exchange,) = harness.exchanges
    answer = exchange.messages[-1]
    assert answer == {"role": "assistant", "content": None, "length": len("It is a heron."),
                      "sha256": hashlib.sha256(b"It is a heron.").hexdigest(),
                      "reasoning_length": len("thinking"), "tool_call_count": 1}
    stored = json.dumps(exchange.to_json())
    for text in ("be brief", "picture", "heron", "thinking", "look"):
        assert text not in stored


async def test_a_failure_is_recorded_with_its_code_and_what_came_before(harness: Harness):
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    _push(harness, "req-0", [Delta(text="partial")])
    harness.upstream.latest.fail(UpstreamStatusError(500, "upstream broke"))
    async with subscription:
        with pytest.raises(UpstreamStatusError):
            await read_all(subscription)
    # Inside the error TTL an identical request gets the remembered failure:
    # it made no upstream call and joins no record.
    late = harness.subscribe("req-late")
    async with late:
        with pytest.raises(UpstreamStatusError):
            await read_all(late)
    (exchange,) = harness.exchanges
    assert exchange.outcome == "failed" and exchange.finish_reason is None
    # Content off: the cause in our words, none of the upstream's text.
    assert exchange.error == {"code": "upstream_500", "message": "the upstream answered 500"}
    assert exchange.messages[-1]["length"] == len("partial")
    assert exchange.request_ids == ("req-0",)
    assert exchange.usage is None and harness.tokens == []


async def test_every_subscriber_leaving_is_a_cancelled_call(harness: Harness):
    first, second = harness.subscribe("req-0"), harness.subscribe("req-1")
    await harness.upstream.next_source()
    _push(harness, "req-0", [Delta(text="a")])
    first.close()
    second.close()
    (exchange,) = harness.exchanges
    assert (exchange.outcome, exchange.finish_reason) == ("cancelled", "cancelled")
    assert exchange.subscribers == 2
    assert harness.upstream.latest.reset_calls == 1


async def test_a_call_that_never_reached_the_upstream_leaves_no_record(harness: Harness):
    harness.upstream.open_gate = asyncio.get_running_loop().create_future()
    subscription = harness.subscribe("req-0")
    await harness.upstream.open_entered.wait()
    # Cancelled while its opener waits: the call had started, so it is one.
    subscription.close()
    assert [e.outcome for e in harness.exchanges] == ["cancelled"]
    # Refused before any opener ran (the queue is full of waiters): no record.
    harness.exchanges.clear()
    harness.upstream.open_gate = None
    gate = AdmissionQueue(max_inflight=1, max_queue=1, queue_timeout_s=30)
    held = gate.enqueue(0.0)
    await held.wait()
    registry = Registry(admission=gate, on_stream_end=harness.recorder.stream_ended)
    call = harness.recorder.call(BODY, "m-1")
    call.bind(harness.upstream.open)
    waiting = registry.subscribe("k", call.open, request_id="req-queued", arrived_at=0.0)
    harness.recorder.joined(call, waiting, None)
    waiting.close()
    held.release()
    await registry.aclose()
    assert harness.exchanges == []


async def test_running_usage_totals_are_counted_once(harness: Harness):
    """Usage reports are running totals: each counts what it adds."""
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    _push(harness, "req-0", [Delta(text="a", usage=Usage(prompt_tokens=10, completion_tokens=1))])
    _push(harness, "req-0", [Delta(text="b", usage=Usage(prompt_tokens=10, completion_tokens=4))])
    harness.upstream.latest.finish()
    async with subscription:
        await read_all(subscription)
    assert harness.tokens == [("m-1", "up-1", 10, 1), ("m-1", "up-1", 0, 3)]
    (exchange,) = harness.exchanges
    assert (exchange.usage.prompt_tokens, exchange.usage.completion_tokens) == (10, 4)


@pytest.mark.parametrize("harness", [True], indirect=True)
async def test_what_a_failed_attempt_decoded_is_not_the_answer(harness: Harness):
    """Routing tried one upstream, which sent a finish and a usage report
    but no token before it failed, then another: the record holds the
    second attempt's answer, usage and upstream, and its tokens count whole."""
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    call = harness.calls["req-0"]
    call.attempt("broken")
    call([Delta(finish_reason="length", usage=Usage(prompt_tokens=10, completion_tokens=0))])
    call.attempt("backup")
    _push(harness, "req-0", [Delta(text="fine"),
                             Delta(finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=2))])
    harness.upstream.latest.finish()
    async with subscription:
        await read_all(subscription)
    (exchange,) = harness.exchanges
    assert exchange.messages[-1] == {"role": "assistant", "content": "fine"}
    assert (exchange.upstream, exchange.finish_reason) == ("backup", "stop")
    assert (exchange.usage.prompt_tokens, exchange.usage.completion_tokens) == (10, 2)
    assert harness.tokens == [("m-1", "broken", 10, 0), ("m-1", "backup", 10, 2)]


@pytest.mark.parametrize("harness", [True], indirect=True)
async def test_the_record_names_the_model_the_upstream_says_answered(harness: Harness):
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    _push(harness, "req-0", [Delta(text="hi", info=StreamInfo("m-1-2025-01-01", "fp")),
                             Delta(finish_reason="stop")])
    harness.upstream.latest.finish()
    async with subscription:
        await read_all(subscription)
    (exchange,) = harness.exchanges
    assert (exchange.model, exchange.resolved_model) == ("m-1", "m-1-2025-01-01")
    assert exchange.to_json()["resolved_model"] == "m-1-2025-01-01"


@pytest.mark.parametrize("harness", [False, True], indirect=True, ids=["content-off", "content-on"])
async def test_an_emoji_split_across_deltas_is_one_character(harness: Harness):
    """An upstream may send an emoji as its two UTF-16 halves in two chunks,
    and a lone half: the record is the answer as a client reads it (pair
    joined, lone half kept), and nothing fails on it."""
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    _push(harness, "req-0", [Delta(text="smile \ud83d"), Delta(text="\ude00 lone \udc00")])
    _push(harness, "req-0", [Delta(text=" end \ud83d")])
    harness.upstream.latest.finish()
    async with subscription:
        await read_all(subscription)
    (exchange,) = harness.exchanges
    text = "smile \U0001f600 lone \udc00 end \ud83d"
    if harness.recorder.keep_content:
        assert exchange.messages[-1]["content"] == text
    else:
        assert exchange.messages[-1]["length"] == len(text) == 20
        assert exchange.messages[-1]["sha256"] == hashlib.sha256(
            text.encode("utf-8", "surrogatepass")).hexdigest()
    assert harness.failed_records == 0


@pytest.mark.parametrize("harness", [True], indirect=True)
async def test_a_recorder_failure_loses_the_record_never_the_stream(harness: Harness):
    """A delta the recorder cannot take (a fragment whose index is a list: a
    bug's stand-in) fails the record once, counted; the deltas still reach
    the reader and the tokens are still counted."""
    subscription = harness.subscribe("req-0")
    await harness.upstream.next_source()
    broken = Delta(tool_calls=(ToolCallDelta([]),))  # type: ignore[arg-type]
    _push(harness, "req-0", [Delta(text="a"), broken])
    _push(harness, "req-0", [broken, Delta(text="b", usage=Usage(prompt_tokens=3,
                                                                 completion_tokens=2))])
    harness.upstream.latest.finish()
    async with subscription:
        deltas = await read_all(subscription)
    assert "".join(delta.text or "" for delta in deltas) == "ab"
    assert harness.exchanges == []
    assert harness.failed_records == 1
    assert harness.tokens == [("m-1", "up-1", 3, 2)]
