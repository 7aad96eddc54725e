"""The HTTP face over real sockets: gateway + simulator. What coalescing,
replay, cancel, timeouts and the error TTL promise runs over both upstream
protocols (``both_protocols``); the rest over h2c."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import aiohttp
import pytest
from aiohttp import ClientConnectionResetError, web
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.keys import prompt_key
from gateway.sim.content import answer_tokens
from gateway.sse import _EventStream
from tests.integration.conftest import FAST_SIM, HELD_SIM, both_protocols, subscribed, until, upstream_held
from tests.integration.sse_frames import FrameReader, native_text, openai_text
from tests.loopback import data_segments_received


def chat(prompt: str, *, stream: bool = True, **extra: object) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": stream,
            **extra}


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


@both_protocols
async def test_openai_stream_frames_in_contract_order(gateway):
    async with aiohttp.ClientSession() as http, http.post(
        gateway.v1 + "/chat/completions",
        json=chat("order of frames", stream_options={"include_usage": True}),
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["X-Request-Id"]
        frames = await FrameReader(resp).rest()
    assert frames[0].raw == b": ping\n\n"
    meta_index = next(i for i, f in enumerate(frames) if f.comment and f.comment.startswith("meta "))
    content_index = next(
        i for i, f in enumerate(frames)
        if f.data and f.data != "[DONE]" and f.json()["choices"]
        and f.json()["choices"][0]["delta"].get("content")
    )
    assert 0 < meta_index < content_index
    meta = json.loads(frames[meta_index].comment[5:])
    assert meta["role"] == "leader" and meta["request_id"] == resp.headers["X-Request-Id"]
    assert meta["ttft_ms"] > 0 and meta["queue_wait_ms"] >= 0
    assert openai_text(frames) == expected("order of frames")
    assert frames[-1].raw == b"data: [DONE]\n\n"
    usage = frames[-2].json()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == FAST_SIM.tokens
    finish = [f.json()["choices"][0]["finish_reason"] for f in frames[:-2]
              if f.data and f.json()["choices"]]
    assert finish[-1] == "stop"


@both_protocols
async def test_native_stream_meta_delta_ids_done(gateway):
    async with aiohttp.ClientSession() as http, http.post(
        gateway.v1 + "/stream", json=chat("native events")
    ) as resp:
        frames = await FrameReader(resp).rest()
    assert frames[0].raw == b": ping\n\n"
    events = [f.event for f in frames[1:]]
    assert events[0] == "meta" and events[-1] == "done"
    assert set(events[1:-1]) == {"delta"}
    meta = frames[1].json()
    assert meta["role"] == "leader" and meta["subscribers"] == 1 and len(meta["key"]) == 12
    ids = [int(f.id) for f in frames if f.event == "delta"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert native_text(frames) == expected("native events")
    done = frames[-1].json()
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == FAST_SIM.tokens
    assert done["total_ms"] >= done["ttft_ms"] > 0


@both_protocols
async def test_fifty_identical_streams_make_one_upstream_call(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "the burst"
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[str, str, list[bytes]]:
            async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt)) as resp:
                frames = await FrameReader(resp).rest()
            meta = next(json.loads(f.comment[5:]) for f in frames
                        if f.comment and f.comment.startswith("meta "))
            return openai_text(frames), meta["role"], [f.raw for f in frames if not f.comment]

        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(one()) for _ in range(50)]
                await subscribed(gateway, 50)  # all in, however slowly they came
        results = [task.result() for task in tasks]
    assert [text for text, _, _ in results] == [expected(prompt)] * 50
    # One completion, the same bytes for everyone (encoded once, shared).
    assert all(raw == results[0][2] for _, _, raw in results)
    roles = sorted(role for _, role, _ in results)
    assert roles.count("leader") == 1 and roles.count("follower") == 49
    assert len(gateway.sim.log.records) == 1
    stats = gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (1, 49)


@both_protocols
async def test_a_late_joiner_gets_the_whole_answer_from_one_call(gateway):
    prompt = "late joiner [sim itl_ms=20 tokens=40]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as first:
            reader = FrameReader(first)
            await _read_deltas(reader, 10)
            async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as late:
                late_frames = await FrameReader(late).rest()
            first_frames = await reader.rest()
    assert native_text(late_frames) == native_text(first_frames) == expected(prompt, 40)
    assert next(f for f in late_frames if f.event == "meta").json()["role"] == "follower"
    assert len(gateway.sim.log.records) == 1


async def _read_deltas(reader: FrameReader, count: int) -> None:
    """Read on until ``count`` delta events have arrived."""
    while sum(1 for f in reader.frames if f.event == "delta") < count:
        assert await reader.next() is not None


async def _abort_and_measure(gateway, prompt: str, *, after_first_token: bool) -> float:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.v1 + "/stream", json=chat(prompt))
        reader = FrameReader(resp)
        assert (await reader.next()).comment == "ping"
        if after_first_token:
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
        else:
            await gateway.sim.log.wait_for_arrivals(1)
        aborted_at = time.monotonic()
        resp.close()  # drops the connection: the client is gone
        (record,) = await gateway.sim.log.wait_for(1, outcome=gateway.cancel_outcome)
    latency_ms = (record.end - aborted_at) * 1000
    print(f"client abort -> upstream RST_STREAM: {latency_ms:.2f} ms")
    assert 0 <= latency_ms < 300
    return latency_ms


@both_protocols
async def test_client_abort_mid_stream_resets_the_upstream(gateway):
    await _abort_and_measure(gateway, "abort mid [sim itl_ms=50 tokens=200]", after_first_token=True)
    await _wait_idle(gateway)


@both_protocols
async def test_client_abort_before_the_first_token_resets_the_upstream(gateway):
    await _abort_and_measure(gateway, "abort early [sim ttft_ms=5000]", after_first_token=False)
    await _wait_idle(gateway)


async def _wait_idle(gateway) -> None:
    async with asyncio.timeout(5):
        await gateway.state.registry.wait_idle()
    stats = gateway.state.registry.statistics()
    assert stats.actors == 0 and stats.subscribers == 0
    assert gateway.state.admission.inflight == 0
    # The relay leaves the stream gauge before it closes the subscription, so
    # by the time the upstream saw the reset the gauge is back to zero.
    assert gateway.state.active_streams == 0
    assert len(gateway.state.keepalive) == 0  # no aborted stream is still pinged


async def test_first_byte_arrives_long_before_a_slow_first_token(gateway):
    async with aiohttp.ClientSession() as http:
        sent_at = time.monotonic()
        async with http.post(
            gateway.v1 + "/chat/completions", json=chat("slow start [sim ttft_ms=1500]")
        ) as resp:
            first = await resp.content.readany()
            first_byte_ms = (time.monotonic() - sent_at) * 1000
            # The ping came before the upstream had sent any token: that is
            # the property; the clock only gets a generous ceiling.
            assert all(record.first_token is None for record in gateway.sim.log.records)
    print(f"first byte after {first_byte_ms:.1f} ms (upstream first token at 1500 ms)")
    assert first.startswith(b": ping\n\n")
    assert first_byte_ms < 1000


@both_protocols
async def test_one_failure_is_shared_by_the_burst_then_forgotten(gateway_factory):
    """The simulator answers the 503 at once (no generation slot): clients
    that come after it are answered from the remembered failure for the
    TTL, so the burst is one upstream call as long as it arrives within 1 s."""
    gateway = await gateway_factory(error_ttl_ms=1000)
    registry = gateway.state.registry
    prompt = "failing [sim fail_status=503]"
    async with aiohttp.ClientSession() as http:

        async def one() -> tuple[int, dict]:
            async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt, stream=False)) as r:
                return r.status, await r.json()

        results = await asyncio.gather(*(one() for _ in range(10)))
        assert {status for status, _ in results} == {502}
        assert all(body["error"]["code"] == "upstream_503" for _, body in results)
        (failure,) = gateway.sim.log.records
        stats = registry.statistics()
        assert (stats.leaders_total, stats.followers_total) == (1, 9)
        # Within the TTL: answered from the remembered failure, no new call.
        assert stats.errors_cached == 1
        status, _ = await one()
        assert status == 502 and len(gateway.sim.log.records) == 1
        # Then forgotten, never before the TTL, and a new call goes upstream.
        await until(lambda: registry.statistics().errors_cached == 0)
        assert failure.end is not None and time.monotonic() - failure.end >= 1.0
        status, _ = await one()
        assert status == 502 and len(gateway.sim.log.records) == 2


#: What the gateway reports when the upstream breaks a stream off: an
#: RST_STREAM over HTTP/2; over HTTP/1.1 the connection closed mid-body (a
#: read error on the real socket).
BROKEN_OFF = {"h2c": "upstream_stream_reset", "http1": "upstream_connection_lost"}
#: ... and what it tells the client of it, in its own words.
BROKEN_OFF_WORDS = {
    "h2c": "the upstream ended the answer abruptly",
    "http1": "the connection to the upstream was lost",
}


@both_protocols
async def test_an_upstream_failure_after_the_200_is_an_in_stream_error(gateway):
    code = BROKEN_OFF[gateway.protocol]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.v1 + "/chat/completions", json=chat("breaks [sim reset_after=3]")
        ) as resp:
            assert resp.status == 200
            frames = await FrameReader(resp).rest()
        # What came before the break reaches the client (up to the three
        # tokens sent: over HTTP/2 a reset arriving in the same read as the
        # last DATA may end the stream first), then the error.
        text = openai_text(frames)
        assert text == expected("breaks [sim reset_after=3]")[: len(text)]
        assert len([f for f in frames if f.data and f.data != "[DONE]"
                    and f.json().get("choices") and f.json()["choices"][0]["delta"].get("content")]) <= 3
        assert frames[-1].json()["error"]["code"] == code
        assert all(f.data != "[DONE]" for f in frames)
        async with http.post(gateway.v1 + "/stream", json=chat("breaks too [sim reset_after=3]")) as r:
            frames = await FrameReader(r).rest()
        error = frames[-1]
        assert error.event == "error"
        assert error.json() == {
            "code": code,
            "message": BROKEN_OFF_WORDS[gateway.protocol],
            "retryable": True,
        }


@both_protocols
async def test_last_event_id_resumes_after_n(gateway):
    prompt = "resume me [sim itl_ms=20 tokens=30]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as first:
            reader = FrameReader(first)
            await _read_deltas(reader, 5)
            last_id = [f.id for f in reader.frames if f.event == "delta"][-1]
            async with http.post(
                gateway.v1 + "/stream", json=chat(prompt), headers={"Last-Event-ID": last_id}
            ) as resumed:
                resumed_frames = await FrameReader(resumed).rest()
            first_frames = await reader.rest()
    resumed_ids = [int(f.id) for f in resumed_frames if f.event == "delta"]
    assert resumed_ids[0] > int(last_id)
    head = "".join(f.json()["text"] for f in first_frames if f.event == "delta"
                   and int(f.id) <= int(last_id))
    assert head + native_text(resumed_frames) == expected(prompt, 30)
    assert len(gateway.sim.log.records) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole answer", "chat stream"])
async def test_a_chat_completion_ignores_last_event_id(gateway, stream):
    """Neither a whole answer nor a chat completions stream has event ids
    (nor one frame per delta of the stream's log), so a Last-Event-ID names
    no point of it: a request that joins a running stream with one still
    gets every token, as a follower."""
    prompt = f"whole despite resume {stream} [sim itl_ms=20 tokens=30]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as first:
            reader = FrameReader(first)
            await _read_deltas(reader, 5)
            async with http.post(
                gateway.v1 + "/chat/completions", json=chat(prompt, stream=stream),
                headers={"Last-Event-ID": "5"},
            ) as joined:
                if stream:
                    frames = await FrameReader(joined).rest()
                    text = openai_text(frames)
                    meta = next(f.comment for f in frames if f.comment and f.comment.startswith("meta "))
                    assert json.loads(meta.removeprefix("meta "))["role"] == "follower"
                else:
                    text = (await joined.json())["choices"][0]["message"]["content"]
            await reader.rest()
    assert text == expected(prompt, 30)
    assert len(gateway.sim.log.records) == 1


@both_protocols
async def test_explicit_cancel_ends_the_stream_with_cancelled(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.v1 + "/stream", json=chat("cancel by id [sim itl_ms=30 tokens=300]")
        ) as resp:
            request_id = resp.headers["X-Request-Id"]
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
            async with http.post(gateway.v1 + f"/requests/{request_id}/cancel") as cancel:
                assert cancel.status == 202
            frames = await reader.rest()
        assert frames[-1].event == "done"
        assert frames[-1].json()["finish_reason"] == "cancelled"
        (record,) = await gateway.sim.log.wait_for(1, outcome=gateway.cancel_outcome)
        assert record.tokens_sent < 300
        async with http.post(gateway.v1 + "/requests/nope/cancel") as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["code"] == "not_found"


@both_protocols
async def test_streaming_and_non_streaming_share_one_call(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "mixed"
    created: set[int] = set()
    async with aiohttp.ClientSession() as http:

        async def streaming() -> str:
            async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt)) as r:
                frames = await FrameReader(r).rest()
            created.update(f.json()["created"] for f in frames if f.data and f.data != "[DONE]")
            return openai_text(frames)

        async def whole() -> str:
            async with http.post(gateway.v1 + "/chat/completions",
                                 json=chat(prompt, stream=False)) as r:
                body = await r.json()
            assert body["object"] == "chat.completion"
            assert body["usage"]["completion_tokens"] == FAST_SIM.tokens
            created.add(body["created"])
            return body["choices"][0]["message"]["content"]

        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(c()) for c in (streaming, whole, streaming, whole)]
                await subscribed(gateway, 4)
    assert [task.result() for task in tasks] == [expected(prompt)] * 4
    assert len(gateway.sim.log.records) == 1
    # One stream, one creation time, in every frame and body.
    assert len(created) == 1


async def test_coalesce_off_header_gets_a_private_call(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "private"
    async with aiohttp.ClientSession() as http:

        async def one(headers: dict[str, str]) -> str:
            async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt),
                                 headers=headers) as r:
                return openai_text(await FrameReader(r).rest())

        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(one(h)) for h in ({}, {"X-Coalesce": "off"}, {})]
                await subscribed(gateway, 3)
    assert [task.result() for task in tasks] == [expected(prompt)] * 3
    assert len(gateway.sim.log.records) == 2
    stats = gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (2, 1)


@pytest.mark.parametrize("upstream_format", ["openai", "anthropic"])
async def test_openai_sdk_streams_and_completes(gateway_factory, upstream_format):
    openai = pytest.importorskip("openai")
    gateway = await gateway_factory(upstream_format=upstream_format)
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key="client-key", max_retries=0)
    try:
        prompt = f"sdk via {upstream_format}"
        stream = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": prompt}], stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == expected(prompt)
        assert usage is not None and usage.completion_tokens == FAST_SIM.tokens
        completion = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": prompt + "!"}]
        )
        assert completion.choices[0].message.content == expected(prompt + "!")
        assert completion.choices[0].finish_reason == "stop"
        paths = {r.path for r in gateway.sim.log.records}
        assert paths == {"/v1/messages" if upstream_format == "anthropic" else "/v1/chat/completions"}
    finally:
        await client.close()


@both_protocols
async def test_openai_sdk_raises_on_an_in_stream_error(gateway):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key="k", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x [sim reset_after=2]"}],
            stream=True,
        )
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
        # The SDK raises the base class itself for an in-stream error; a
        # dropped connection would be its subclass APIConnectionError.
        assert type(info.value) is openai.APIError
        assert info.value.body["code"] == BROKEN_OFF[gateway.protocol]
        assert info.value.body["type"] == "upstream_error"
    finally:
        await client.close()



@both_protocols
async def test_first_token_and_idle_timeouts_are_told_apart(gateway_factory):
    """A role chunk or keepalive before the first token does not start the
    idle clock: the first-token timeout holds until real content arrives."""
    gateway = await gateway_factory(upstream_first_token_timeout_ms=2000, upstream_idle_timeout_ms=250)
    async with aiohttp.ClientSession() as http:

        async def native(prompt: str) -> list:
            async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as resp:
                return await FrameReader(resp).rest()

        slow_start = await native("slow start [sim ttft_ms=600 tokens=4]")
        assert slow_start[-1].event == "done"
        assert native_text(slow_start) == expected("slow start [sim ttft_ms=600 tokens=4]", 4)

        stalls = await native("stalls [sim itl_ms=700 tokens=4]")
        assert stalls[-1].event == "error"
        assert stalls[-1].json()["code"] == "upstream_timeout"
        got = native_text(stalls)
        assert got == expected("stalls [sim itl_ms=700 tokens=4]", 4)[: len(got)]

        never = await native("never starts [sim ttft_ms=5000]")
        assert never[-1].json()["code"] == "upstream_timeout"
        assert native_text(never) == ""
    records = await gateway.sim.log.wait_for(3)
    assert sorted(r.outcome for r in records) == sorted(["complete"] + [gateway.cancel_outcome] * 2)


async def test_keepalive_pings_only_a_silent_stream(gateway_factory):
    gateway = await gateway_factory(ping_interval_s=0.2, first_token_ping_interval_ms=0)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream",
                             json=chat("quiet start [sim ttft_ms=700 itl_ms=50 tokens=16]")) as resp:
            frames = await FrameReader(resp).rest()
    first_delta = next(i for i, f in enumerate(frames) if f.event == "meta")
    before, after = frames[:first_delta], frames[first_delta:]
    # ~700 ms of silence at a 200 ms interval: the first ping, then a ping
    # per 200 ms of silence. The silence is the upstream's, as it measured
    # it (a loaded machine stretches it; the count follows).
    (record,) = gateway.sim.log.records
    assert record.first_token is not None
    silence_s = record.first_token - record.arrival
    assert all(f.comment == "ping" for f in before)
    assert 2 <= len(before) <= 2 + silence_s / 0.2
    # 16 tokens 50 ms apart for ~800 ms: never 200 ms of silence, so no ping.
    assert not any(f.comment == "ping" for f in after)
    assert native_text(frames) == expected("quiet start [sim ttft_ms=700 itl_ms=50 tokens=16]", 16)
    assert len(gateway.state.keepalive) == 0  # a finished stream is pinged no more


async def test_a_stream_waiting_for_its_first_token_is_pinged_often(gateway_factory):
    """Every FIRST_TOKEN_PING_INTERVAL_MS until the first token, whatever
    PING_INTERVAL_S says; from the first token on, only silence is pinged."""
    gateway = await gateway_factory(ping_interval_s=60, first_token_ping_interval_ms=100)
    prompt = "waiting [sim ttft_ms=700 itl_ms=50 tokens=16]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as resp:
            reader = FrameReader(resp)
            first = await reader.next()
            assert first is not None and first.comment == "ping"
            assert gateway.state.keepalive.waiting == 1
            frames = [first, *await reader.rest()]
    first_delta = next(i for i, f in enumerate(frames) if f.event == "meta")
    before, after = frames[:first_delta], frames[first_delta:]
    # The ping at once, then one every 100 ms for 700 ms: ~7 more.
    assert all(f.comment == "ping" for f in before) and 6 <= len(before) <= 9
    gaps = [b.at - a.at for a, b in zip(before, before[1:], strict=False)]
    assert max(gaps) < 0.2
    assert not any(f.comment == "ping" for f in after)
    assert native_text(frames) == expected(prompt, 16)
    assert gateway.state.keepalive.waiting == 0 and len(gateway.state.keepalive) == 0


def _gateway_tasks() -> int:
    """Tasks in this loop but the in-process simulator's own."""
    return sum(
        "gateway/sim/" not in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        for task in asyncio.all_tasks()
    )


async def test_one_task_pings_every_open_stream(gateway_factory):
    """No keepalive task per stream: an open stream costs the gateway a
    connection task, a handler task and an actor task, and every silent
    stream is still pinged."""
    gateway = await gateway_factory(ping_interval_s=0.1)
    async with aiohttp.ClientSession() as http:
        responses = []
        for i in range(5):
            resp = await http.post(gateway.v1 + "/stream", json=chat(f"idle {i} [sim ttft_ms=60000]"))
            responses.append(resp)
            await gateway.sim.log.wait_for_arrivals(i + 1)
            if i == 0:
                with_one = _gateway_tasks()
        assert (_gateway_tasks() - with_one) / 4 == 3
        assert len(gateway.state.keepalive) == 5
        for resp in responses:
            reader = FrameReader(resp)
            pings = [await reader.next() for _ in range(3)]  # the first one and two keepalives
            assert all(f is not None and f.comment == "ping" for f in pings)
            resp.close()
    await _wait_idle(gateway)


async def test_an_open_stream_holds_no_connection_idle_timer(gateway):
    """aiohttp arms a keep-alive timer per connection and leaves it armed
    while a request is served: a loop timer per open stream, for as long as
    it streams. The stream drops it (~600 bytes of each idle
    stream); a connection kept alive after its stream has it again, so an
    idle client is still closed in time."""
    port = int(gateway.url.rsplit(":", 1)[1])
    before = _connection_idle_timers(port)
    slow = "idle timer [sim ttft_ms=0 itl_ms=60000 tokens=2]"
    async with aiohttp.ClientSession() as http:
        responses = [
            await http.post(gateway.v1 + "/chat/completions", json=chat(f"{slow} {i}")).__aenter__()
            for i in range(3)
        ]
        for resp in responses:
            ping = await FrameReader(resp).next()
            assert ping is not None and ping.comment == "ping"
        assert _connection_idle_timers(port) == before  # not before + 3
        for resp in responses:
            resp.close()
    await _wait_idle(gateway)
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat("kept alive")) as resp:
            assert openai_text(await FrameReader(resp).rest()) == expected("kept alive")
        # No event marks it: aiohttp arms the timer once its request task has
        # ended, a few loop ticks after the last bytes went out.
        for _ in range(1000):
            if _connection_idle_timers(port) == before + 1:
                break
            await asyncio.sleep(0)
        assert _connection_idle_timers(port) == before + 1


def _connection_idle_timers(port: int) -> int:
    """aiohttp's keep-alive timers armed in this loop for connections to
    ``port`` (not the simulator's, whatever its protocol)."""
    count = 0
    for handle in asyncio.get_running_loop()._scheduled:  # type: ignore[attr-defined]
        callback = handle._callback
        if handle.cancelled() or getattr(callback, "__name__", "") != "_process_keepalive":
            continue
        transport = callback.__self__.transport
        count += transport is not None and transport.get_extra_info("sockname")[1] == port
    return count


def _await_chain(task: asyncio.Task) -> list[str]:
    """The coroutines a suspended task waits through, outermost first."""
    chain = []
    coro = task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        chain.append(coro.cr_code.co_qualname)
        coro = coro.cr_await
    return chain


def _local(task: asyncio.Task, qualname: str, name: str) -> object:
    """A local of one coroutine in a suspended task's await chain."""
    coro = task.get_coro()
    while coro.cr_code.co_qualname != qualname:  # type: ignore[union-attr]
        coro = coro.cr_await  # type: ignore[union-attr]
    return coro.cr_frame.f_locals[name]  # type: ignore[union-attr]


def _bytes_held(task: asyncio.Task) -> list[str]:
    """The locals holding bytes in a suspended task's coroutines."""
    held = []
    coro = task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        for name, value in coro.cr_frame.f_locals.items():
            if isinstance(value, bytes | bytearray | memoryview) and value:
                held.append(f"{coro.cr_code.co_qualname}: {name}")
        coro = coro.cr_await
    return held


async def test_an_idle_stream_waits_through_short_await_chains(gateway_factory):
    """Every coroutine in a waiting task's chain is a frame (~230 bytes)
    that each idle stream holds: the actor waits on the h2 stream's read
    (a coroutine, so that cancelling it loses no data) through its source
    alone, the handler on the subscription through the relay."""
    gateway = await gateway_factory()
    prompt = "idle chain [sim ttft_ms=0 itl_ms=60000 tokens=2]"  # then a minute's wait
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt)) as resp:
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and not (
                frame.data and frame.json().get("choices")
            ):
                pass
            # The first token has reached the client: the actor appended it
            # and went back to its read, and the handler wrote it and parked,
            # each in the same step, so both tasks wait now.
            tasks = asyncio.all_tasks()
            (actor,) = [task for task in tasks if task.get_name().startswith("stream-actor-")]
            assert _await_chain(actor) == [
                "StreamActor._run",
                "UpstreamSource.__anext__",
                "H2ResponseStream.read",
            ]
            (handler,) = [task for task in tasks if _await_chain(task)[-1:] == ["relay"]]
            assert _await_chain(handler)[-3:] == ["envelope", "chat_completions", "relay"]
            # Nor do their frames keep what went through them (a read's
            # bytes, a written frame) while they wait.
            assert _bytes_held(actor) == []
            assert _bytes_held(handler) == []
            # Read by one client, the stream shares no frame and keeps none:
            # its memo stays empty (OpenAI's "created" is the stream's own).
            assert _local(handler, "relay", "subscription").memo == {}
            # The stream's read deadline is an entry in the gateway's shared
            # deadlines, not a loop timer of its own.
            assert len(gateway.state.deadlines) == 1
    await _wait_idle(gateway)


async def test_a_stream_waiting_for_its_first_token_holds_no_read(gateway_factory):
    """Before the first token the retrying source is in the actor's chain
    too; a read that carried no token (the role chunk) must not stay held
    by a frame that waits for the next one."""
    gateway = await gateway_factory()
    prompt = "first wait [sim ttft_ms=60000 tokens=2]"  # the role chunk, then a minute
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=chat(prompt)) as resp:
            assert resp.status == 200
            await subscribed(gateway, 1)
            (actor,) = [task for task in asyncio.all_tasks()
                        if task.get_name().startswith("stream-actor-")]

            def role_chunk_decoded() -> bool:
                chain = _await_chain(actor)
                return "UpstreamSource.__anext__" in chain and chain[-1:] == ["H2ResponseStream.read"] and (
                    _local(actor, "UpstreamSource.__anext__", "self")._decoder._info_seen
                )

            # The role chunk (it carries the model, and no delta) was read
            # and decoded; the source waits for the next read.
            await until(role_chunk_decoded)
            assert _await_chain(actor) == [
                "StreamActor._run",
                "RetryingSource._until_first_token",
                "UpstreamSource.__anext__",
                "H2ResponseStream.read",
            ]
            assert _bytes_held(actor) == []
    await _wait_idle(gateway)


@both_protocols
async def test_an_answers_last_chunks_and_its_end_leave_in_one_write(gateway_factory):
    # A 1-token answer: its token, finish and usage chunks and the upstream's
    # end arrive together. They are logged before the handler wakes, so the
    # frames, [DONE] and the chunked body's end go out in one write.
    gateway = await gateway_factory(
        sim_profile=dataclasses.replace(FAST_SIM, ttft_ms=200, tokens=1),
        first_token_ping_interval_ms=0,  # no ping while the token is awaited
    )
    body = json.dumps(chat("one segment", stream_options={"include_usage": True})).encode()
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        async with asyncio.timeout(10):
            await reader.readuntil(b": ping\n\n\r\n")
            before = data_segments_received(writer.get_extra_info("socket"))
            rest = await reader.readuntil(b"\r\n0\r\n\r\n")
        after = data_segments_received(writer.get_extra_info("socket"))
    finally:
        writer.close()
    assert b'"content":' in rest and rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert after - before == 1


async def test_a_client_gone_at_the_last_write_is_a_cancel(gateway, monkeypatch):
    # A client's reset seen in the loop pass before its last write: aiohttp
    # refuses that write (the transport is closing) before the handler is
    # cancelled. That is the client leaving, logged as a cancel, not an
    # unhandled error answered 500. The failure is aiohttp's own exception,
    # raised where aiohttp raises it.
    write_eof = web.StreamResponse.write_eof

    async def on_a_closing_transport(self: web.StreamResponse, data: bytes = b"") -> None:
        if isinstance(self, _EventStream):
            raise ClientConnectionResetError("Cannot write to closing transport")
        await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", on_a_closing_transport)
    with capture_logs(processors=[merge_contextvars]) as logs:
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway.v1 + "/chat/completions", json=chat("gone at the end")) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["outcome"] == "cancelled" and line["status"] == 200
    assert not [entry for entry in logs if entry.get("log_level") in ("error", "critical")]


async def _resume_starts_over(gateway, prompt: str, headers: dict[str, str], joined_off) -> None:
    """Resume after delta 5 of a running stream (once ``joined_off()`` says
    it takes no joiners): the resumed request gets its own upstream call,
    from delta 1, not the deltas after 5."""
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as first:
            reader = FrameReader(first)
            await _read_deltas(reader, 5)
            await joined_off()
            async with http.post(
                gateway.v1 + "/stream", json=chat(prompt), headers={"Last-Event-ID": "5", **headers}
            ) as resumed:
                resumed_reader = FrameReader(resumed)
                while (frame := await resumed_reader.next()) is not None and frame.event != "delta":
                    pass
    assert frame is not None and frame.id == "1"
    assert frame.json() == {"text": expected(prompt, 400)[: len(frame.json()["text"])]}
    assert len(gateway.sim.log.records) == 2


async def test_a_resume_past_the_replay_budget_starts_the_answer_over(gateway_factory):
    """Past MAX_REPLAY_BYTES a running stream takes no joiners, a resumed
    one included: Last-Event-ID then starts a new answer from id 1."""
    gateway = await gateway_factory(max_replay_bytes=1024)
    prompt = "over budget [sim itl_ms=5 tokens=400]"
    key = prompt_key(chat(prompt), tenant=None)
    registry = gateway.state.registry

    async def budget_spent() -> None:
        await until(lambda: not registry.has(key))

    await _resume_starts_over(gateway, prompt, {}, budget_spent)


async def test_a_resume_with_coalesce_off_starts_the_answer_over(gateway):
    """X-Coalesce: off joins no stream, the one to resume included."""
    prompt = "private resume [sim itl_ms=5 tokens=400]"

    async def at_once() -> None:
        pass

    await _resume_starts_over(gateway, prompt, {"X-Coalesce": "off"}, at_once)


async def test_a_resume_past_the_last_delta_gets_only_done(gateway):
    """Last-Event-ID past every delta the stream will have: nothing to
    send but its end, with no meta, no first token and no usage."""
    prompt = "resume past the end [sim itl_ms=20 tokens=20]"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat(prompt)) as first:
            reader = FrameReader(first)
            await _read_deltas(reader, 5)
            async with http.post(
                gateway.v1 + "/stream", json=chat(prompt), headers={"Last-Event-ID": "1000"}
            ) as resumed:
                frames = await FrameReader(resumed).rest()
            await reader.rest()
    assert [f.event for f in frames if f.comment is None] == ["done"]
    done = frames[-1].json()
    assert (done["finish_reason"], done["usage"], done["ttft_ms"]) == ("stop", None, None)
    assert len(gateway.sim.log.records) == 1
