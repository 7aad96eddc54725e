"""The source's read deadlines (one lazily moved timer per stream), against
the simulator over h2c: each deadline fires when due, not when an earlier
one would have, and a finished source leaves no timer behind."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref

import aiohttp
import pytest

from gateway.app import running_gateway
from gateway.errors import UpstreamTimeout
from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.providers import get_provider
from gateway.upstream.source import SourceTimeouts, UpstreamSource
from tests.integration.h2_pools import h2_pool
from tests.integration.quiet_h2_peer import gateway_settings, quiet_h2_peer

QUICK = SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=5, itl_jitter_ms=0, tokens=6)


def chat(prompt: str) -> UpstreamRequest:
    body = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
    return UpstreamRequest(
        "POST", "/v1/chat/completions", (("content-type", "application/json"),), json.dumps(body).encode()
    )


def answer(prompt: str, tokens: int) -> list[str]:
    """The simulator's tokens for ``prompt``."""
    return answer_tokens([{"role": "user", "content": prompt}], tokens)


@pytest.fixture
async def pool(sim_factory):
    sim = await sim_factory(QUICK)
    pool = h2_pool(sim.url)
    yield pool
    await pool.aclose()


async def started(pool: H2Pool, prompt: str, timeouts: SourceTimeouts) -> UpstreamSource:
    # Deadlines of its own (the gateway shares one among all its sources).
    source = UpstreamSource(
        pool, get_provider("openai"), chat(prompt), timeouts=timeouts, deadlines=Deadlines()
    )
    await source.start()
    return source


async def test_the_idle_deadline_replaces_a_later_first_token_one(pool):
    # Content flows, then stalls: the 0.3 s idle deadline must fire, not
    # the 30 s first-token one the timer was first armed at.
    source = await started(pool, "stall [sim itl_ms=60000 tokens=3]", SourceTimeouts(30.0, 0.3))
    got = []
    started_at = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="went idle"):
        async for delta in source:
            got.append(delta.text)
    # The first token came, then the gap.
    assert "".join(got) == answer("stall [sim itl_ms=60000 tokens=3]", 3)[0]
    assert 0.3 <= time.monotonic() - started_at < 10  # generous: the point is "not 30 s"


async def test_reads_that_keep_coming_never_time_out(pool):
    # 6 tokens 50 ms apart, idle deadline 0.2 s: the timer moves every read
    # and the stream completes.
    source = await started(pool, "steady [sim itl_ms=50]", SourceTimeouts(5.0, 0.2))
    text = "".join([delta.text async for delta in source])
    assert text == "".join(answer("steady [sim itl_ms=50]", QUICK.tokens))


async def test_no_first_token_in_time(pool):
    source = await started(pool, "silent [sim ttft_ms=60000]", SourceTimeouts(0.2, 30.0))
    with pytest.raises(UpstreamTimeout, match="no first token"):
        async for _ in source:
            pass


@pytest.mark.parametrize("how", ["completed", "reset"])
async def test_a_finished_source_leaves_no_timer_behind(pool, how):
    # A timer still armed would keep the source (and its stream) alive in
    # the loop's schedule for up to the whole deadline.
    source = await started(pool, f"finished {how}", SourceTimeouts(30.0, 30.0))
    if how == "completed":
        assert [delta async for delta in source]
    else:
        await anext(source)
        source.reset()
    ref = weakref.ref(source)
    del source
    gc.collect()
    assert ref() is None


async def test_time_between_reads_is_not_the_upstreams(pool):
    # Tokens every 40 ms, an idle deadline of 80 ms, and a consumer that
    # dawdles 120 ms per delta: the deadline passes between reads, never
    # during one (each read finds data waiting), so no timeout.
    source = await started(pool, "dawdle [sim itl_ms=40 tokens=12]", SourceTimeouts(5.0, 0.08))
    got = []
    async for delta in source:
        got.append(delta.text)
        await asyncio.sleep(0.12)  # the consumer's own pace: what this test is about
    assert "".join(got)


@pytest.mark.parametrize("head", [True, False], ids=["head-then-nothing", "no-head"])
async def test_the_first_token_deadline_covers_the_head_and_the_first_data(head):
    """The source alone times an answer: a peer that sends a head and then
    nothing, or no head at all, ends at the first-token deadline with the
    source's words, and gets RST_STREAM."""
    async with quiet_h2_peer(head=head, first_data=None) as peer:
        quiet_pool = h2_pool(f"http://127.0.0.1:{peer.port}")
        try:
            source = await started(quiet_pool, "then nothing", SourceTimeouts(0.3, 30.0))
            with pytest.raises(UpstreamTimeout, match="sent no first token within its timeout"):
                async with asyncio.timeout(10):  # generous: the deadline is 0.3 s
                    await anext(source)
            assert await asyncio.wait_for(peer.resets.get(), 5) == 1
        finally:
            await quiet_pool.aclose()


async def test_the_first_token_deadline_ends_the_wait_to_send_a_refused_request_again():
    """The upstream refuses the request (REFUSED_STREAM, RFC 9113 §8.7) and
    takes one stream at a time, and another stream then holds that slot:
    the request waits to be sent again. The first-token deadline ends that
    wait when it passes, with the source's words, not when a slot frees or
    the slot timeout (60 s here) runs out, and the request is not sent."""
    async with quiet_h2_peer(refuse_first=1, max_concurrent_streams=1) as peer:
        quiet_pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1, slot_timeout=60.0)
        try:
            source = await started(quiet_pool, "refused, then waits", SourceTimeouts(0.3, 30.0))
            # Sent once the refusal has freed the slot; then holds it (a
            # head and nothing more).
            holder = await quiet_pool.open(chat("holds the slot"))
            assert holder.stream_id == 3
            with pytest.raises(UpstreamTimeout, match="sent no first token within its timeout"):
                async with asyncio.timeout(10):  # generous: the deadline is 0.3 s
                    await anext(source)
            assert not quiet_pool._waiters
            holder.reset()
            assert await asyncio.wait_for(peer.resets.get(), 5) == 3
        finally:
            await quiet_pool.aclose()
    assert peer.requests == [1, 3]  # the refused request was not sent again


async def test_a_model_list_that_never_comes_ends_at_the_first_token_deadline():
    """/v1/models from an upstream that takes the request over h2c and
    never answers: the gateway answers 504 upstream_timeout in OpenAI's
    error shape once the first-token timeout (0.3 s) has passed, and resets
    the upstream stream."""
    async with quiet_h2_peer(head=False) as peer:
        settings = gateway_settings(peer, upstream_first_token_timeout_ms=300)
        async with running_gateway(settings) as (_, url), aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):  # generous: the deadline is 0.3 s
                async with http.get(url + "/v1/models") as response:
                    body = await response.json()
            assert await asyncio.wait_for(peer.resets.get(), 5) == 1
    assert response.status == 504
    assert body["error"]["code"] == "upstream_timeout"
    assert body["error"]["type"] == "timeout_error"
    assert body["error"]["message"] == "the upstream did not answer in time"


def test_under_uvloop_a_due_watchdog_times_out_once_not_in_a_spin():
    """uvloop's timers fire up to half a millisecond early: a watchdog that
    re-checked its deadline without the deadlines' resolution would re-arm
    for a time already due and run again in the same pass, hundreds of
    times, until the clock ticked over."""
    uvloop = pytest.importorskip("uvloop")

    class CountedSource(UpstreamSource):
        watchdog_runs = 0

        def _on_watchdog(self) -> None:
            CountedSource.watchdog_runs += 1
            super()._on_watchdog()

    async def main() -> None:
        async with quiet_h2_peer(first_data=None) as peer:
            quiet_pool = h2_pool(f"http://127.0.0.1:{peer.port}")
            shared = Deadlines()
            try:
                # Deadlines 0.5 ms apart over 20 ms: many fall where uvloop's
                # rounding fires the timer early.
                sources = [
                    CountedSource(
                        quiet_pool,
                        get_provider("openai"),
                        chat(f"watched {i}"),
                        timeouts=SourceTimeouts(0.05 + i / 2_000, 30.0),
                        deadlines=shared,
                    )
                    for i in range(40)
                ]
                for source in sources:
                    await source.start()

                async def times_out(source: UpstreamSource) -> None:
                    with pytest.raises(UpstreamTimeout, match="sent no first token"):
                        await anext(source)

                async with asyncio.timeout(10):
                    await asyncio.gather(*(times_out(source) for source in sources))
            finally:
                shared.close()
                await quiet_pool.aclose()

    uvloop.run(main())
    assert CountedSource.watchdog_runs == 40  # once each
