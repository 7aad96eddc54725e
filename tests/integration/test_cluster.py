"""Cluster mode over real sockets: redis-server, three gateway processes and
one simulator (in this process, so its request log is the upstream's truth).

Each test is one promise of the single-process gateway, held across
processes: one upstream call per burst, the whole answer for a late joiner,
a reset only when the last subscriber anywhere leaves, a shared failure
forgotten after the error TTL, a local open when nobody streams the prompt,
a dead owner taken over at once, and serving on when Redis is gone.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from redis.asyncio import Redis

from gateway.cluster.directory import Directory
from gateway.keys import prompt_key
from gateway.sim.content import answer_tokens
from gateway.sim.log import Record
from gateway.sim.server import SimServer
from tests.integration.cluster_fixture import (
    REDIS_SERVER,
    Member,
    RedisServer,
    running_member,
    running_redis,
)
from tests.integration.conftest import FAST_SIM
from tests.integration.faulty_upstream import faulty_upstream
from tests.integration.nginx_fixture import NGINX, free_port, running_nginx
from tests.integration.sse_frames import Frame, FrameReader, native_text, openai_text

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def chat(prompt: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": stream}


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


@dataclass
class Cluster:
    redis: RedisServer
    sim: SimServer
    members: list[Member]

    def calls(self) -> list[Record]:
        """Upstream requests so far (the simulator's log)."""
        return self.sim.log.records


@pytest.fixture
async def cluster(tmp_path: Path, sim_factory) -> AsyncIterator[Cluster]:
    sim = await sim_factory(FAST_SIM)
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        members = list(
            await asyncio.gather(
                *(stack.enter_async_context(running_member(sim.url, redis.url)) for _ in range(3))
            )
        )
        yield Cluster(redis, sim, members)
        for number, member in enumerate(members):  # shown when a test fails
            print(f"-- member {number} ({member.url}) output:", *member.output, sep="\n")


async def stream_native(
    http: aiohttp.ClientSession, member: Member, prompt: str, *, last_event_id: int | None = None
) -> list[Frame]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with http.post(member.url + "/v1/stream", json=chat(prompt), headers=headers) as resp:
        assert resp.status == 200
        return await FrameReader(resp).rest()


async def stream_openai(http: aiohttp.ClientSession, member: Member, prompt: str) -> list[Frame]:
    async with http.post(member.url + "/v1/chat/completions", json=chat(prompt)) as resp:
        assert resp.status == 200
        return await FrameReader(resp).rest()


def meta_role(frames: list[Frame]) -> str:
    for frame in frames:
        if frame.event == "meta":
            return str(frame.json()["role"])
        if frame.comment and frame.comment.startswith("meta "):
            return str(json.loads(frame.comment[5:])["role"])
    raise AssertionError("no meta record")


# -- 1. a burst spread over the processes: one upstream call ----------------------------


async def test_fifty_identical_prompts_over_three_processes_make_one_upstream_call(cluster):
    prompt = "the cluster burst [sim ttft_ms=2500]"
    before = await cluster.redis.commandstats()
    async def one(http: aiohttp.ClientSession, i: int) -> str:
        """Native, OpenAI streaming and OpenAI ``stream: false``, each kind
        on every process."""
        member, kind = cluster.members[i % 3], (i // 3) % 3
        if kind == 0:
            return native_text(await stream_native(http, member, prompt))
        if kind == 1:
            return openai_text(await stream_openai(http, member, prompt))
        body = chat(prompt, stream=False)
        async with http.post(member.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            return str((await resp.json())["choices"][0]["message"]["content"])

    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(one(http, i) for i in range(50)))
    assert answers == [expected(prompt)] * 50
    await cluster.sim.log.wait_for(1)
    assert len(cluster.calls()) == 1
    roles = {"owner": 0.0, "local_follower": 0.0, "remote_follower": 0.0}
    for member in cluster.members:
        for role in roles:
            roles[role] += await member.metric("gateway_cluster_requests_total", f'role="{role}"')
    claims = (await cluster.redis.commandstats())["set"] - before.get("set", 0)
    print(f"50 requests over 3 processes: {roles}; {claims} Redis claims")
    # One claim per process: its other requests wait for that decision.
    assert claims == 3
    assert roles["owner"] == 1 and sum(roles.values()) == 50
    assert roles["remote_follower"] >= 2 * 16  # the two other processes, about a third each


# -- 2. late joiner elsewhere; Last-Event-ID on any process ----------------------------


async def test_late_joiner_on_another_process_gets_the_whole_answer_and_resumes_anywhere(
    cluster,
):
    prompt = "the late joiner [sim itl_ms=40 tokens=60]"
    owner, other, third = cluster.members
    async with aiohttp.ClientSession() as http:
        first = await http.post(owner.url + "/v1/stream", json=chat(prompt))
        reader = FrameReader(first)
        deltas = 0
        while deltas < 10:
            frame = await reader.next()
            assert frame is not None
            deltas += frame.event == "delta"
        # Ten tokens in: a joiner on another process, and resumes after delta
        # 10 on the third process and on the owner itself.
        late, resumed_elsewhere, resumed_on_owner = await asyncio.gather(
            stream_native(http, other, prompt),
            stream_native(http, third, prompt, last_event_id=10),
            stream_native(http, owner, prompt, last_event_id=10),
        )
        rest = await reader.rest()
        first.release()
    assert native_text(rest) == expected(prompt, 60)
    assert native_text(late) == expected(prompt, 60)
    assert meta_role(late) == "follower"
    tail = "".join(answer_tokens([{"role": "user", "content": prompt}], 60)[10:])
    for resumed in (resumed_elsewhere, resumed_on_owner):
        ids = [int(f.id) for f in resumed if f.event == "delta" and f.id is not None]
        assert ids == list(range(11, 61))
        assert native_text(resumed) == tail
    assert len(cluster.calls()) == 1


# -- 3. reset only when the last subscriber anywhere leaves --------------------------------


async def _abort(resp: aiohttp.ClientResponse) -> float:
    assert resp.connection is not None and resp.connection.transport is not None
    aborted_at = time.monotonic()
    resp.connection.transport.abort()
    resp.close()
    return aborted_at


async def _read_deltas(reader: FrameReader, count: int) -> None:
    seen = 0
    while seen < count:
        frame = await reader.next()
        assert frame is not None, "the stream ended early"
        seen += frame.event == "delta"


async def _stream_on(
    http: aiohttp.ClientSession, member: Member, prompt: str, deltas: int
) -> tuple[aiohttp.ClientResponse, FrameReader]:
    """A /v1/stream request on ``member``, read to its ``deltas``-th delta."""
    response = await http.post(member.url + "/v1/stream", json=chat(prompt))
    reader = FrameReader(response)
    await _read_deltas(reader, deltas)
    return response, reader


async def test_upstream_is_reset_only_when_the_last_subscriber_anywhere_leaves(cluster):
    owner, follower, _ = cluster.members
    latencies_ms = []
    rounds = 20
    async with aiohttp.ClientSession() as http:
        for n in range(rounds):
            prompt = f"cancel across processes {n} [sim itl_ms=20 tokens=500]"
            on_owner = await http.post(owner.url + "/v1/stream", json=chat(prompt))
            owner_reader = FrameReader(on_owner)
            await _read_deltas(owner_reader, 1)
            on_follower = await http.post(follower.url + "/v1/stream", json=chat(prompt))
            follower_reader = FrameReader(on_follower)
            await _read_deltas(follower_reader, 1)
            # The owner's client leaves: the follower elsewhere keeps reading
            # and the upstream stream stays open.
            await _abort(on_owner)
            await _read_deltas(follower_reader, 5)
            (record,) = [r for r in cluster.calls() if not r.ended]
            # The last subscriber, on the other process, leaves: now the reset.
            aborted_at = await _abort(on_follower)
            await cluster.sim.log.wait_for(n + 1, outcome="reset")
            reset = next(r for r in cluster.sim.log.ended("reset") if r.id == record.id)
            assert reset.end is not None
            latencies_ms.append((reset.end - aborted_at) * 1000)
    assert len(cluster.calls()) == rounds
    latencies_ms.sort()
    p95 = latencies_ms[math.ceil(0.95 * rounds) - 1]
    print(f"last abort on another process -> upstream RST_STREAM over {rounds} rounds: "
          f"p50 {latencies_ms[rounds // 2]:.2f} ms, p95 {p95:.2f} ms, max {latencies_ms[-1]:.2f} ms")
    assert all(latency >= 0 for latency in latencies_ms)
    # The target is 10 ms; the ceiling leaves room for a loaded machine.
    assert p95 < 100
    for member in (owner, follower):
        await member.wait_metric("gateway_active_actors", 0)
        await member.wait_metric("gateway_active_streams", 0)


# -- 4. a failure is shared everywhere, then forgotten ---------------------------------------


async def test_failure_is_shared_across_processes_and_forgotten_after_the_error_ttl(cluster):
    prompt = "the failing prompt [sim ttft_ms=300 fail_status=500]"
    async with aiohttp.ClientSession() as http:
        burst = await asyncio.gather(
            *(stream_native(http, cluster.members[i % 3], prompt) for i in range(12))
        )
        (failed,) = await cluster.sim.log.wait_for(1)
        for frames in burst:
            assert frames[-1].event == "error"
            assert frames[-1].json()["code"] == "upstream_500"
            assert not any(f.event == "done" for f in frames)
        assert len(cluster.calls()) == 1
        # Inside the error TTL (2 s), on every process: the same failure, no call.
        again = await asyncio.gather(
            *(stream_native(http, member, prompt) for member in cluster.members)
        )
        assert all(frames[-1].event == "error" for frames in again)
        assert len(cluster.calls()) == 1
        # The shared entry: the failure, for what is left of the 2 s.
        entry = Directory.key(prompt_key(chat(prompt), tenant=None))
        client = Redis.from_url(cluster.redis.url)
        try:
            async with asyncio.timeout(1.5):
                while not (await client.get(entry) or b"").startswith(b"e "):  # noqa: ASYNC110 - Redis's state
                    await asyncio.sleep(0.02)
            assert 0 < await client.pttl(entry) <= 2000
        finally:
            await client.aclose()
        # Then forgotten everywhere: a request leads a new call. Until then
        # each is answered with the failure. Every process learnt of it
        # after the call arrived, so none forgets it sooner than 2 s after
        # (less 10 ms for the timers); the ceiling, twice the TTL, leaves
        # room for a loaded machine and still fails a failure never forgotten.
        async with asyncio.timeout(failed.arrival + 4.0 - time.monotonic()):
            while len(cluster.calls()) == 1:
                after = await stream_native(http, cluster.members[1], prompt)
                assert after[-1].event == "error"
                await asyncio.sleep(0.05)
    calls = cluster.calls()
    assert len(calls) == 2
    assert calls[1].arrival >= failed.arrival + 2.0 - 0.01


# -- 4b. what other processes are told of a failure ------------------------------------------


async def test_a_failure_reaches_other_processes_as_the_owners_clients_got_it(tmp_path):
    """An upstream's error page (HTML, an address behind it) is for the
    owner's log: its clients get the cause in our words, and so do a
    follower on another process (over the internal hop) and a request on a
    third one (from the failure entry in Redis)."""
    async with faulty_upstream() as upstream, AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        owner, follower, late = await asyncio.gather(*(
            stack.enter_async_context(
                running_member(upstream.url, redis.url, {"UPSTREAM_PROTOCOL": "http1"})
            )
            for _ in range(3)
        ))
        prompt = "held status-page"
        client = Redis.from_url(redis.url)
        try:
            async with aiohttp.ClientSession() as http:
                on_owner = asyncio.create_task(stream_native(http, owner, prompt))
                await upstream.held.wait()  # the owner's call waits upstream
                on_follower = asyncio.create_task(stream_native(http, follower, prompt))
                await owner.wait_metric("gateway_cluster_peer_streams_total", 1)
                upstream.release.set()
                answers = list(await asyncio.gather(on_owner, on_follower))
                # Within the error TTL, once the owner has recorded the failure.
                entry = Directory.key(prompt_key(chat(prompt), tenant=None))
                async with asyncio.timeout(5):
                    while not (await client.get(entry) or b"").startswith(b"e "):  # noqa: ASYNC110 - Redis's state
                        await asyncio.sleep(0.02)
                answers.append(await stream_native(http, late, prompt))
        finally:
            await client.aclose()
    assert upstream.requests == 1
    errors = [frames[-1] for frames in answers]
    assert [frame.event for frame in errors] == ["error"] * 3
    told = errors[0].json()
    assert told["message"] == "the upstream answered 502" and told["code"] == "upstream_502"
    for frame in errors[1:]:
        assert frame.json() == told
        assert b"10.0.0.7" not in frame.raw and b"<h1>" not in frame.raw


# -- 4c. a failure past the replay budget: shared as well ------------------------------------


async def test_a_failure_past_the_replay_budget_is_shared_across_processes(tmp_path, sim_factory):
    """The stream outgrows its replay budget (1 KiB), so its key is released
    for the next request to lead anew; then the upstream resets it. Within
    the error TTL the failure answers on every process, with no new call."""
    sim = await sim_factory(FAST_SIM)
    budget = {"MAX_REPLAY_BYTES": "1024"}
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        owner, other = await asyncio.gather(*(
            stack.enter_async_context(running_member(sim.url, redis.url, budget)) for _ in range(2)
        ))
        prompt = "fails past the replay budget [sim itl_ms=2 tokens=400 reset_after=100]"
        entry = Directory.key(prompt_key(chat(prompt), tenant=None))
        client = Redis.from_url(redis.url)
        stack.push_async_callback(client.aclose)
        async with aiohttp.ClientSession() as http:
            first = await stream_native(http, owner, prompt)
            assert first[-1].event == "error"
            told = first[-1].json()
            assert told["code"] == "upstream_stream_reset"
            assert len([f for f in first if f.event == "delta"]) == 100
            # The failure entry, written within the error TTL (2 s).
            async with asyncio.timeout(1.5):
                while not (await client.get(entry) or b"").startswith(b"e "):  # noqa: ASYNC110 - Redis's state
                    await asyncio.sleep(0.02)
            again = await asyncio.gather(
                stream_native(http, owner, prompt), stream_native(http, other, prompt)
            )
    assert len(sim.log.records) == 1
    for frames in again:
        assert frames[-1].event == "error"
        assert frames[-1].json()["code"] == told["code"]
        assert not any(f.event == "delta" for f in frames)


# -- 5. nobody streams it: opened where it arrived, one Redis round trip -----------------------


async def test_a_prompt_nobody_streams_is_opened_locally_with_one_redis_round_trip(cluster):
    async with aiohttp.ClientSession() as http:
        # Warm every member's Redis connection (its handshake is not per request).
        start = await cluster.redis.commandstats()
        await asyncio.gather(
            *(stream_native(http, m, f"warm {i}") for i, m in enumerate(cluster.members))
        )
        await cluster.sim.log.wait_for(3)
        # The warm-up streams' releases (one DEL each) follow their ends: wait
        # for all three, or one would land among this request's counts.
        async with asyncio.timeout(5):
            while (await cluster.redis.commandstats()).get("del", 0) < start.get("del", 0) + 3:  # noqa: ASYNC110 - Redis's counters
                await asyncio.sleep(0.02)
        target = cluster.members[1]
        before = await cluster.redis.commandstats()
        served_before = [await m.metric("gateway_cluster_peer_streams_total") for m in cluster.members]
        prompt = "nobody else asks this"
        frames = await stream_native(http, target, prompt)
        # The release follows the stream's end: wait for it (the event).
        released = before.get("evalsha", 0) + 1
        async with asyncio.timeout(5):
            while (after := await cluster.redis.commandstats()).get("evalsha", 0) < released:  # noqa: ASYNC110 - Redis's counters
                await asyncio.sleep(0.02)
    assert native_text(frames) == expected(prompt)
    assert meta_role(frames) == "leader"
    changed = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    # One SET (NX GET) on the request's way (a takeover would SET again, in
    # its script); then, off its way, the release: one script's DEL. Lease
    # renewals and the member list may tick meanwhile: they are not counted.
    assert changed.get("set") == 1, changed
    assert changed.get("del") == 1, changed
    assert changed.get("zrangebyscore", 0) == 0, changed
    assert await target.metric("gateway_cluster_requests_total", 'role="owner"') == 2
    stats = await target.stats()
    assert stats["process"] == {"pid": target.pid, "worker": 0, "workers": 1}
    section = stats["cluster"]
    assert section["enabled"] is True and section["up"] is True
    assert section["advertise_url"].startswith("http://127.0.0.1:")
    assert section["requests"] == {"owner": 2, "local_follower": 0, "remote_follower": 0}
    assert section["redis_ms"]["samples"] >= 2 and section["redis_ms"]["p95"] is not None
    assert section["owned_keys"] == 0 and section["redis_errors"] == 0
    served_after = [await m.metric("gateway_cluster_peer_streams_total") for m in cluster.members]
    assert served_after == served_before  # no forwarding anywhere
    assert len(cluster.calls()) == 4


# -- 6. the owner dies mid-stream ---------------------------------------------------------


@pytest.mark.parametrize("fate", ["killed", "frozen"])
async def test_owner_gone_mid_stream_followers_get_an_error_and_a_survivor_takes_over(
    cluster, fate
):
    """Killed: the kernel closes its connections, followers know at once.
    Frozen (SIGSTOP: a hung process, or a host off the network): nothing
    closes them; the owner's heartbeat stops and followers give up after
    4 s of silence. Either way the next request is served without waiting
    for the lease."""
    prompt = f"the owner is {fate} [sim itl_ms=5 tokens=2000]"
    owner, follower, survivor = cluster.members
    async with aiohttp.ClientSession() as http:
        on_owner, _ = await _stream_on(http, owner, prompt, 1)
        on_follower, reader = await _stream_on(http, follower, prompt, 3)
        gone_at = time.monotonic()
        if fate == "killed":
            owner.kill()
        else:
            owner.service.process.send_signal(signal.SIGSTOP)
        try:
            rest = await reader.rest()
            ended_s = time.monotonic() - gone_at
            on_follower.release()
            print(f"owner {fate} -> follower's in-stream error after {ended_s * 1000:.1f} ms")
            assert ended_s < (2.0 if fate == "killed" else 8.0)
            assert rest[-1].event == "error"
            assert rest[-1].json()["code"] == "cluster_owner_lost"
            assert rest[-1].json()["retryable"] is True
            assert not any(f.event == "done" for f in rest)
            # The lease still names the gone owner: its address refuses (or
            # does not answer within 1 s), so the next request for the same
            # prompt is served at once, by a new upstream call.
            async with http.post(survivor.url + "/v1/stream", json=chat(prompt)) as resp:
                fresh = FrameReader(resp)
                await _read_deltas(fresh, 1)
        finally:
            if fate == "frozen":
                owner.service.process.send_signal(signal.SIGCONT)
            on_owner.close()
    meta = next(f.json() for f in fresh.frames if f.event == "meta")
    assert meta["role"] == "leader"
    print(f"a request for the gone owner's prompt on a survivor: TTFT {meta['ttft_ms']} ms")
    assert meta["ttft_ms"] < (1000 if fate == "killed" else 3000)  # the lease has 10 s left
    assert await survivor.metric("gateway_cluster_takeovers_total") == 1
    assert len(cluster.calls()) == 2


# -- 6b. a follower process frozen mid-stream ------------------------------------------------


async def test_a_frozen_follower_process_is_dropped_and_the_upstream_reset(cluster):
    """A follower process that hangs (SIGSTOP: its kernel still acknowledges
    every byte, as a partitioned host's would not) stops sending the empty
    line its relay sends every second: after 4 s of silence the owner drops
    it, and as its last subscriber, resets the upstream stream."""
    prompt = "the follower is frozen [sim itl_ms=5 tokens=2000]"
    owner, follower, _ = cluster.members
    async with aiohttp.ClientSession() as http:
        on_owner, _ = await _stream_on(http, owner, prompt, 1)
        on_follower, reader = await _stream_on(http, follower, prompt, 3)
        assert meta_role(reader.frames) == "follower"
        follower.service.process.send_signal(signal.SIGSTOP)
        try:
            # Both clients go; only the owner's leaving is seen (the
            # follower process cannot act on its client's).
            await _abort(on_follower)
            left_at = await _abort(on_owner)
            (reset,) = await cluster.sim.log.wait_for(1, outcome="reset", timeout=10)
        finally:
            follower.service.process.send_signal(signal.SIGCONT)
    assert reset.end is not None
    dropped_s = reset.end - left_at
    print(f"frozen follower dropped, upstream reset {dropped_s:.2f} s after the owner's client left")
    assert 3.5 < dropped_s < 6.0  # the 4 s silence bound, checked every 0.5 s
    assert reset.tokens_sent < 2000
    assert len(cluster.calls()) == 1
    await owner.wait_metric("gateway_active_actors", 0)


async def test_a_live_follower_waiting_past_the_silence_bound_is_kept(cluster):
    """A first token slower than the 4 s silence bound: the owner writes
    nothing the while, but the follower's relay keeps sending its empty
    lines, so it is not dropped and gets the whole answer."""
    prompt = "a first token past the silence bound [sim ttft_ms=4600 tokens=5]"
    owner, follower, _ = cluster.members
    async with aiohttp.ClientSession() as http:
        on_owner = asyncio.create_task(stream_native(http, owner, prompt))
        await cluster.sim.log.wait_for_arrivals(1)
        on_follower = await stream_native(http, follower, prompt)
        await on_owner
    assert meta_role(on_follower) == "follower"
    assert native_text(on_follower) == expected(prompt, 5)
    assert on_follower[-1].event == "done"
    assert len(cluster.calls()) == 1


# -- 7. Redis down or stalled: local-only, then back ----------------------------------------


@pytest.mark.parametrize("outage", ["stopped", "paused"])
async def test_redis_outage_serves_locally_and_cluster_coalescing_resumes(cluster, outage):
    members = cluster.members
    async with aiohttp.ClientSession() as http:
        await stream_native(http, members[0], "before the outage")
        entry = Directory.key(prompt_key(chat("before the outage"), tenant=None))
        async with asyncio.timeout(5):  # its key released before Redis goes
            while await cluster.redis.keys(entry):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.02)
        if outage == "stopped":
            await cluster.redis.stop()
        else:
            cluster.redis.pause()
        prompt = "during the outage [sim ttft_ms=200]"
        before = len(cluster.calls())
        started = time.monotonic()
        during = await asyncio.gather(
            *(stream_native(http, members[i % 3], prompt) for i in range(6))
        )
        took_s = time.monotonic() - started
        assert all(native_text(frames) == expected(prompt) for frames in during)
        for member in members:
            await member.wait_metric("gateway_cluster_up", 0)
        # Local-only coalescing: at most one call per process.
        assert 1 <= len(cluster.calls()) - before <= 3
        print(f"6 requests during the outage ({outage}) in {took_s:.2f} s")
        assert took_s < 3.0  # a ceiling: the first request waits 250 ms at most
        if outage == "stopped":
            await cluster.redis.start()
        else:
            cluster.redis.resume()
        back_at = time.monotonic()
        for member in members:
            await member.wait_metric("gateway_cluster_up", 1, timeout=10)
        print(f"cluster coalescing back {time.monotonic() - back_at:.2f} s after Redis")
        calls = len(cluster.calls())
        prompt = "after the outage [sim ttft_ms=1500]"
        after = await asyncio.gather(
            *(stream_native(http, members[i % 3], prompt) for i in range(9))
        )
    assert all(native_text(frames) == expected(prompt) for frames in after)
    assert len(cluster.calls()) == calls + 1
    # The owner released its key at the end (a restarted Redis had forgotten
    # the scripts: they were loaded again). A claim sent into the stalled
    # Redis ran when it woke: that one is left to its lease.
    entry = Directory.key(prompt_key(chat(prompt), tenant=None))
    async with asyncio.timeout(5):
        while await cluster.redis.keys(entry):  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(0.02)
    for member in members:
        lines = [line for line in member.output if "cluster directory unavailable" in line]
        assert len(lines) == 1, member.output


# -- through the shipped nginx site, three gateways in its upstream -----------------------


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
async def test_through_nginx_a_burst_over_three_gateways_makes_one_upstream_call(
    cluster, tmp_path
):
    first, *more = (int(m.url.rsplit(":", 1)[1]) for m in cluster.members)
    async with running_nginx(first, tmp_path / "nginx", trustme.CA(),
                             more_gateway_ports=more) as site:
        connector = aiohttp.TCPConnector(ssl=site.client_ssl())
        async with aiohttp.ClientSession(site.https_url, connector=connector) as http:
            prompt = "the burst through nginx and three gateways [sim ttft_ms=2000]"

            async def one() -> str:
                async with http.post("/v1/chat/completions", json=chat(prompt)) as resp:
                    assert resp.status == 200
                    return openai_text(await FrameReader(resp).rest())

            answers = await asyncio.gather(*(one() for _ in range(30)))
            # Then a late joiner and the last-leaves-cancels rule, through nginx.
            slow = "through nginx, aborted [sim itl_ms=20 tokens=500]"
            streams = []
            for _ in range(3):
                resp = await http.post("/v1/stream", json=chat(slow))
                await _read_deltas(FrameReader(resp), 1)
                streams.append(resp)
            for resp in streams[:-1]:
                await _abort(resp)
            # Two of three gone (wherever nginx sent them): the call stays open.
            await _read_deltas(FrameReader(streams[-1]), 3)
            (still_open,) = [r for r in cluster.calls() if not r.ended]
            await _abort(streams[-1])
            (reset,) = await cluster.sim.log.wait_for(1, outcome="reset")
            assert reset.id == still_open.id
    assert answers == [expected(prompt)] * 30
    assert len(cluster.calls()) == 2
    served = [
        sum([await m.metric("gateway_cluster_requests_total", f'role="{role}"')
             for role in ("owner", "local_follower", "remote_follower")])
        for m in cluster.members
    ]
    print(f"requests per gateway behind nginx: {served}")
    assert sum(served) == 33 and all(n > 0 for n in served)


# -- the internal hop's secret and an advertised address ----------------------------------


async def test_members_with_a_secret_and_advertised_ports_coalesce_and_refuse_strangers(
    tmp_path, sim_factory
):
    sim = await sim_factory(FAST_SIM)
    port = free_port()
    secret = {"CLUSTER_SECRET": "a shared secret"}
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        owner = await stack.enter_async_context(running_member(
            sim.url, redis.url, secret | {"CLUSTER_ADVERTISE_URL": f"http://127.0.0.1:{port}"}
        ))
        other = await stack.enter_async_context(running_member(sim.url, redis.url, secret))
        internal = (await owner.stats())["cluster"]["advertise_url"]
        assert internal == f"http://127.0.0.1:{port}"
        prompt = "a secret burst [sim itl_ms=30 tokens=40]"
        async with aiohttp.ClientSession() as http:
            first = await http.post(owner.url + "/v1/stream", json=chat(prompt))
            reader = FrameReader(first)
            await _read_deltas(reader, 1)
            key = next(f.json()["key"] for f in reader.frames if f.event == "meta")
            # The internal listener refuses a request without the secret, or
            # with another one; the member with it follows.
            for headers in ({}, {"Authorization": "Bearer not the secret"}):
                path = f"{internal}/cluster/v1/streams/{key}"
                async with http.get(path, headers=headers) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"
            # A header that is not UTF-8 (aiohttp's client will not send one).
            raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
            raw_writer.write(b"GET /cluster/v1/streams/" + key.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
            assert (await raw_reader.read()).startswith(b"HTTP/1.1 401 ")
            raw_writer.close()
            late = await stream_native(http, other, prompt)
            rest = await reader.rest()
            first.release()
    assert native_text(late) == native_text(reader.frames) == expected(prompt, 40)
    assert rest[-1].event == "done"
    assert len(sim.log.records) == 1


# -- an explicit cancel that lands on another process ------------------------------------


async def test_explicit_cancel_received_by_another_process_ends_the_stream(cluster):
    owner, other, _ = cluster.members
    prompt = "cancel me from elsewhere [sim itl_ms=20 tokens=500]"
    async with aiohttp.ClientSession() as http:
        async with http.post(owner.url + "/v1/stream", json=chat(prompt)) as resp:
            reader = FrameReader(resp)
            await _read_deltas(reader, 1)
            request_id = next(f.json()["request_id"] for f in reader.frames if f.event == "meta")
            async with http.post(other.url + f"/v1/requests/{request_id}/cancel") as cancel:
                assert cancel.status == 202
                assert (await cancel.json())["status"] == "cancelled"
            frames = await reader.rest()
        assert frames[-1].event == "done"
        assert frames[-1].json()["finish_reason"] == "cancelled"
        await cluster.sim.log.wait_for(1, outcome="reset")
        async with http.post(other.url + "/v1/requests/no-such-request/cancel") as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["code"] == "not_found"


async def test_without_redis_stats_say_so_and_no_cluster_series_exist(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/stats") as resp:
            stats = await resp.json()
        async with http.get(gateway.url + "/metrics") as resp:
            exposition = await resp.text()
    assert stats["cluster"] == {"enabled": False}
    assert stats["process"]["workers"] == 1 and stats["process"]["worker"] == 0
    assert "gateway_cluster_" not in exposition


async def test_a_member_with_another_secret_is_served_locally_and_said_once(tmp_path, sim_factory):
    sim = await sim_factory(FAST_SIM)
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        owner = await stack.enter_async_context(
            running_member(sim.url, redis.url, {"CLUSTER_SECRET": "one secret"}))
        stranger = await stack.enter_async_context(
            running_member(sim.url, redis.url, {"CLUSTER_SECRET": "another secret"}))
        async with aiohttp.ClientSession() as http:
            for n in range(2):
                prompt = f"mismatched secrets {n} [sim itl_ms=20 tokens=30]"
                first = await http.post(owner.url + "/v1/stream", json=chat(prompt))
                await _read_deltas(FrameReader(first), 1)
                other = await stream_native(http, stranger, prompt)
                first.close()
                assert native_text(other) == expected(prompt, 30)
    # Served anyway (the key taken over: one more upstream call each), and
    # the configuration error said once.
    assert len(sim.log.records) == 4
    said = [line for line in stranger.output if "refused our CLUSTER_SECRET" in line]
    assert len(said) == 1, stranger.output


# -- 12. a member that drains -----------------------------------------------------------------


async def _until_refused(member: Member) -> None:
    """Until ``member``'s listener is closed: the same tick its drain begins."""
    port = int(member.url.rsplit(":", 1)[1])
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except (ConnectionRefusedError, ConnectionResetError):  # reset: closed mid-accept
                return
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.02)


async def test_a_request_on_another_member_leads_rather_than_follow_a_draining_owner(cluster):
    """A draining member takes no new request, not even through another
    member: that member leads the prompt itself, and its client gets the
    whole answer, not the owner's ``shutting_down`` at the owner's drain
    timeout (1 s here: the answer takes 3 s)."""
    prompt = "owned by a member that drains [sim itl_ms=20 tokens=150]"
    owner, other, _ = cluster.members
    async with aiohttp.ClientSession() as http:
        on_owner, owner_reader = await _stream_on(http, owner, prompt, 1)
        owner.service.process.send_signal(signal.SIGTERM)
        await _until_refused(owner)
        async with asyncio.timeout(20):
            frames = await stream_native(http, other, prompt)
            await owner_reader.rest()
        on_owner.release()
        async with asyncio.timeout(10):
            assert await owner.service.process.wait() == 0
    assert owner_reader.frames[-1].json()["code"] == "shutting_down"
    assert meta_role(frames) == "leader"
    assert native_text(frames) == expected(prompt, 150)
    assert frames[-1].event == "done"
    assert len(cluster.calls()) == 2
