"""The pooled HTTP/2 client against the simulator, over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time

import pytest

from gateway.errors import (
    UpstreamConnectionLost,
    UpstreamStreamRefused,
    UpstreamStreamReset,
    UpstreamTimeout,
)
from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer
from gateway.upstream.base import ResponseStream, UpstreamRequest
from gateway.upstream.h2 import connection as h2_connection
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.origin import Origin
from gateway.upstream.providers import get_provider
from tests.integration.quiet_h2_peer import quiet_h2_peer

FAST = SimProfile(ttft_ms=2, ttft_jitter_ms=0, itl_ms=0, itl_jitter_ms=0, tokens=16)


def chat_request(prompt: str, *, stream: bool = True, **sim: object) -> UpstreamRequest:
    messages = [{"role": "user", "content": prompt}]
    body = {"model": "sim", "messages": messages, "stream": stream}
    headers = [("content-type", "application/json")]
    headers += [(f"x-sim-{name.replace('_', '-')}", str(value)) for name, value in sim.items()]
    return UpstreamRequest("POST", "/v1/chat/completions", tuple(headers), json.dumps(body).encode())


def expected_text(prompt: str, tokens: int, token_size: int | None = None) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens, token_size))


async def read_all(stream: ResponseStream) -> bytes:
    parts = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


def decoded_text(body: bytes) -> str:
    decoder = get_provider("openai").decoder()
    deltas = decoder.feed(body) + decoder.close()
    return "".join(d.text for d in deltas)


@pytest.fixture
async def fast_sim(sim_factory):
    return await sim_factory(FAST)


@pytest.fixture
async def pools():
    """``pools(sim, **options)``: an H2Pool on the simulator, closed after the test."""
    opened: list[H2Pool] = []

    def make(sim: SimServer, **kwargs: object) -> H2Pool:
        opened.append(H2Pool(Origin.parse(sim.url), **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield make
    for pool in opened:
        await pool.aclose()


async def test_200_concurrent_streams_share_one_connection_and_arrive_exact(fast_sim, pools):
    pool = pools(fast_sim, max_connections=1)
    prompts = [f"question number {i}" for i in range(200)]
    streams = await asyncio.gather(*(pool.open(chat_request(p)) for p in prompts))
    assert pool.connection_count() == 1
    bodies = await asyncio.gather(*(read_all(s) for s in streams))
    for prompt, stream, body in zip(prompts, streams, bodies, strict=True):
        assert (await stream.head()).status == 200
        assert decoded_text(body) == expected_text(prompt, FAST.tokens)
    records = await fast_sim.log.wait_for(200, outcome="complete")
    assert {r.http_version for r in records} == {"HTTP/2"}


async def test_the_head_is_handed_over_once_and_not_kept(fast_sim, pools):
    """An open stream does not hold its response headers once the consumer
    has them: every idle stream would (tests/perf/PROFILES.md, memory)."""
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("head once"))
    head = await stream.head()
    assert head.status == 200 and head.header("content-type") is not None
    # Neither the stream nor anything it holds (it kept a future of it)
    # refers to the head any more.
    held = [obj for ref in gc.get_referents(stream) for obj in (ref, *gc.get_referents(ref))]
    assert not any(obj is head for obj in held)
    with pytest.raises(RuntimeError, match="already taken"):
        await stream.head()
    assert decoded_text(await read_all(stream)) == expected_text("head once", FAST.tokens)


async def test_the_first_byte_deadline_is_an_entry_of_the_pool_until_the_first_data(fast_sim, pools):
    """Not a loop timer per waiting stream: the pool's shared deadlines."""
    pool = pools(fast_sim)
    streams = [await pool.open(chat_request(f"deadline {i}")) for i in range(3)]
    assert len(pool._deadlines) == 3
    for stream in streams:
        assert (await stream.head()).status == 200
        assert await stream.read()
    assert len(pool._deadlines) == 0
    for stream in streams:
        stream.release()


async def test_streams_beyond_max_concurrent_open_a_second_connection_then_wait(sim_factory, pools):
    sim = await sim_factory(dataclasses.replace(FAST, max_concurrent_streams=10))
    pool = pools(sim, max_connections=2)
    slow = {"ttft_ms": 60_000}
    first = [await pool.open(chat_request(f"slow {i}", **slow)) for i in range(20)]
    assert pool.connection_count() == 2
    waiting = asyncio.ensure_future(pool.open(chat_request("waits for a slot")))
    await asyncio.sleep(0)  # one loop step: open() runs up to its capacity wait
    assert len(pool._waiters) == 1 and not waiting.done()
    first[0].reset()  # frees one slot: the waiter takes it
    stream = await asyncio.wait_for(waiting, 5)
    assert decoded_text(await read_all(stream)) == expected_text("waits for a slot", 16)
    assert pool.connection_count() == 2
    for s in first[1:]:
        s.reset()


async def test_reset_reaches_the_simulator_within_a_few_ms(fast_sim, pools):
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("cancel me", itl_ms=20, tokens=500))
    assert (await stream.head()).status == 200
    assert await stream.read()  # mid-stream
    aborted_at = time.monotonic()
    stream.reset()
    (record,) = await fast_sim.log.wait_for(1, outcome="reset")
    latency_ms = (record.end - aborted_at) * 1000
    print(f"reset -> simulator saw it: {latency_ms:.2f} ms")
    # Typically well under 5 ms; the ceiling is for a loaded machine, and
    # still far below the ~10 s the 500 tokens would take on their own.
    assert 0 <= latency_ms < 2000
    assert record.tokens_sent < 500
    assert await stream.read() == b""  # a reset stream reads as ended


async def test_reset_before_the_first_byte_reaches_the_simulator(fast_sim, pools):
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("never answered", ttft_ms=60_000))
    await fast_sim.log.wait_for_arrivals(1)
    aborted_at = time.monotonic()
    stream.reset()
    (record,) = await fast_sim.log.wait_for(1, outcome="reset")
    assert record.first_token is None and record.tokens_sent == 0
    assert 0 <= record.end - aborted_at < 2.0  # generous; the answer was 60 s away
    with pytest.raises(UpstreamStreamReset):
        await stream.head()


async def test_a_paused_consumer_slows_only_its_own_stream(fast_sim, pools):
    pool = pools(fast_sim, max_connections=1)
    big = await pool.open(chat_request("big", tokens=1024, token_size=1024))
    assert (await big.head()).status == 200
    # While nobody reads `big`, another stream on the same connection
    # completes: the paused stream holds only its own window.
    small = await pool.open(chat_request("small"))
    assert decoded_text(await read_all(small)) == expected_text("small", 16)
    buffered = sum(len(data) for data in big._chunks)  # type: ignore[attr-defined]
    assert buffered <= 65_535
    assert pool.connection_count() == 1
    body = await read_all(big)
    assert len(body) > 1024 * 1024
    assert decoded_text(body) == expected_text("big", 1024, 1024)


async def test_a_request_body_larger_than_the_peers_window_is_sent_whole(fast_sim, pools):
    pool = pools(fast_sim)
    prompt = "long " * 60_000  # 300 KB: several times the 65,535-byte window
    stream = await pool.open(chat_request(prompt))
    assert decoded_text(await read_all(stream)) == expected_text(prompt, 16)


@pytest.mark.parametrize("answers_early", [False, True], ids=["silent", "answers-early"])
async def test_a_body_the_peer_never_opens_a_window_for_times_out(answers_early):
    """The wait for window to send a request body is bounded by the
    first-byte timeout, on either of the pool's paths (a free slot takes no
    timeout context of its own), also when the peer has already answered
    with HEADERS and DATA: then the stream's first-byte timer has nothing
    left to time, and the bound on the body's wait is all there is. The peer
    is a bare h2 server that grants no stream window
    (SETTINGS_INITIAL_WINDOW_SIZE 0, RFC 9113 §6.5.2) and never a
    WINDOW_UPDATE."""
    peer_answers = quiet_h2_peer(
        head=answers_early, first_data=b"data: {}\n\n" if answers_early else None, initial_window_size=0
    )
    async with peer_answers as peer:
        pool = H2Pool(Origin.parse(f"http://127.0.0.1:{peer.port}"), first_byte_timeout=0.3)
        try:
            # The first open connects (the pool's bounded path); the second, with
            # a slot free, takes the path without a timeout context.
            for attempt in range(2):
                assert pool.connection_count() == attempt  # 0: the bounded path; 1: a slot free
                # Silent, the stream's first-byte timer may end it first (same
                # deadline, no head in time); answering early, only the bound
                # on the body's wait can.
                expected = "no window for the request body" if answers_early else "in time"
                with pytest.raises(UpstreamTimeout, match=expected):
                    # Bounded here too, so a wait nothing ends fails the test
                    # rather than hanging it (generous: the deadline is 0.3 s).
                    await asyncio.wait_for(pool.open(chat_request(f"no window for me {attempt}")), 5)
                # RST_STREAM for each: the peer holds nothing open.
                assert await asyncio.wait_for(peer.resets.get(), 5) == 2 * attempt + 1
        finally:
            await pool.aclose()  # the peer reads the end of the connection and stops


@pytest.mark.parametrize(
    ("then", "timeouts", "expected"),
    [
        ("head only", {"first_byte_timeout": 0.3, "idle_timeout": None}, "no data past its timeout"),
        ("data, then silence", {"first_byte_timeout": 5.0, "idle_timeout": 0.3}, "went idle past"),
    ],
)
async def test_a_read_pending_at_a_deadline_ends_with_the_timeout(then, timeouts, expected):
    """A read waiting when the first-byte or the idle deadline passes is
    answered with the timeout (never with a clean end), later reads too, and
    the peer gets RST_STREAM. A bare h2 peer that answers, then goes quiet."""
    first_data = None if then == "head only" else b"data: {}\n\n"
    async with quiet_h2_peer(first_data=first_data) as peer:
        pool = H2Pool(Origin.parse(f"http://127.0.0.1:{peer.port}"), **timeouts)  # type: ignore[arg-type]
        try:
            stream = await pool.open(chat_request("then quiet"))
            assert (await stream.head()).status == 200
            if first_data is not None:
                assert await stream.read() == first_data
            pending = stream.read()
            assert not pending.done()
            with pytest.raises(UpstreamTimeout, match=expected):
                await asyncio.wait_for(pending, 5)  # generous: the deadline is 0.3 s
            with pytest.raises(UpstreamTimeout, match=expected):
                await stream.read()
            assert await asyncio.wait_for(peer.resets.get(), 5) == 1
        finally:
            await pool.aclose()


async def test_an_abandoned_read_leaves_no_idle_deadline_behind(fast_sim, pools):
    """A read whose reader left must not time the next read with its own
    (earlier) idle deadline."""
    pool = pools(fast_sim, idle_timeout=30.0)
    stream = await pool.open(chat_request("then silence", ttft_ms=0, itl_ms=60_000, tokens=3))
    assert (await stream.head()).status == 200
    while (read := stream.read()).done():
        assert read.result()  # what came at once; then the silence
    assert stream._idle_deadline is not None  # this read's (the first DATA came)
    assert len(pool._deadlines) == 1
    read.cancel()  # its reader leaves
    pending = stream.read()
    assert len(pool._deadlines) == 1  # the new read's own, nothing of the first
    stream.reset()
    assert await pending == b""
    assert len(pool._deadlines) == 0


async def test_goaway_refused_stream_is_retryable_and_next_stream_uses_a_new_connection(fast_sim, pools):
    pool = pools(fast_sim)
    warmup = await pool.open(chat_request("warm up"))
    await read_all(warmup)
    refused = await pool.open(chat_request("refuse me", goaway="refuse"))
    with pytest.raises(UpstreamStreamRefused) as info:
        await refused.head()
    assert info.value.retryable
    again = await pool.open(chat_request("after goaway"))
    assert decoded_text(await read_all(again)) == expected_text("after goaway", 16)
    records = await fast_sim.log.wait_for(2, outcome="complete")
    assert len({r.connection_id for r in records}) == 2
    assert pool.connection_count() == 1


async def test_graceful_goaway_finishes_the_stream_and_moves_on(fast_sim, pools):
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("last on this connection", goaway="graceful"))
    assert decoded_text(await read_all(stream)) == expected_text("last on this connection", 16)
    nxt = await pool.open(chat_request("first on the next"))
    assert decoded_text(await read_all(nxt)) == expected_text("first on the next", 16)
    records = await fast_sim.log.wait_for(2, outcome="complete")
    assert len({r.connection_id for r in records}) == 2


async def test_a_killed_connection_fails_all_its_streams_and_the_pool_recovers(fast_sim, pools):
    pool = pools(fast_sim, max_connections=1)
    bystander = await pool.open(chat_request("bystander", itl_ms=50, tokens=200))
    victim = await pool.open(chat_request("victim", itl_ms=1, tokens=200, kill_after=3))
    with pytest.raises(UpstreamConnectionLost):
        await read_all(victim)
    with pytest.raises(UpstreamConnectionLost):
        await read_all(bystander)
    assert pool.connection_count() == 0
    fresh = await pool.open(chat_request("fresh"))
    assert decoded_text(await read_all(fresh)) == expected_text("fresh", 16)
    assert pool.connection_count() == 1


async def test_an_upstream_reset_after_some_tokens_is_reported(fast_sim, pools):
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("reset by peer", reset_after=3))
    with pytest.raises(UpstreamStreamReset):
        await read_all(stream)
    # The connection survives a stream reset.
    other = await pool.open(chat_request("still fine"))
    assert decoded_text(await read_all(other)) == expected_text("still fine", 16)
    assert pool.connection_count() == 1


async def test_abandoned_streams_do_not_leak_the_connection_window(fast_sim, pools):
    """Reset 300 streams that each received data nobody read: the
    connection window must come back (FIELD-NOTES: acknowledge everything)."""
    pool = pools(fast_sim, max_connections=1)
    for i in range(300):
        stream = await pool.open(chat_request(f"abandon {i}", tokens=64, token_size=256))
        await stream.head()
        assert await stream.read()
        stream.reset()
    final = await pool.open(chat_request("after abandoning", tokens=256, token_size=256))
    assert decoded_text(await read_all(final)) == expected_text("after abandoning", 256, 256)
    assert pool.connection_count() == 1


async def test_a_stream_many_windows_long_in_small_frames_reads_to_its_end(fast_sim, pools):
    """What a reader consumes is credited back in batches (ACK_BATCH_BYTES),
    not at every read: a stream seven stream windows long, sent as DATA
    frames of ~150 bytes, still flows to its end; once it ended the
    connection owes the peer nothing."""
    pool = pools(fast_sim, max_connections=1)
    stream = await pool.open(chat_request("a long one", tokens=3000))
    async with asyncio.timeout(30):
        body = await read_all(stream)
    assert len(body) > 7 * 65_535
    assert decoded_text(body) == expected_text("a long one", 3000)
    connection = stream._conn  # type: ignore[attr-defined]
    assert connection._owed == {} and connection._owed_total == 0


async def test_what_open_streams_owe_together_is_settled_at_the_limit(fast_sim, pools, monkeypatch):
    """Each stream owes less than a batch, but together they reach the
    connection's limit: everything owed is credited then (else small debts
    on many streams could exhaust the connection window)."""
    monkeypatch.setattr(h2_connection, "_OWED_LIMIT", 4096)
    pool = pools(fast_sim, max_connections=1)
    streams = [await pool.open(chat_request(f"owing {i}", itl_ms=60_000)) for i in range(40)]
    read = 0
    for stream in streams:
        read += len(await stream.read())  # the first token; the next one is a minute away
    connection = streams[0]._conn  # type: ignore[attr-defined]
    assert read > 4096  # so the limit was reached at least once
    assert connection._owed_total < 4096
    assert 0 < len(connection._owed) < len(streams)
    for stream in streams:
        stream.reset()
    assert connection._owed == {} and connection._owed_total == 0


async def test_streams_left_unread_cannot_starve_a_reader_of_the_connection_window(
    fast_sim, pools, monkeypatch
):
    """Three streams nobody reads hold 192 KiB of a (shrunk) 256 KiB
    connection window: below the floor, what the one reader consumes is
    credited at every read again, so h2 can reopen the window and the
    reader's stream flows to its end instead of stalling with credit owed."""
    monkeypatch.setattr(h2_connection, "CONNECTION_WINDOW", 256 * 1024)
    monkeypatch.setattr(h2_connection, "_OWED_LIMIT", 64 * 1024)
    pool = pools(fast_sim, max_connections=1)
    unread = [await pool.open(chat_request(f"left unread {i}", tokens=2000)) for i in range(3)]
    reader = await pool.open(chat_request("read to the end", tokens=6000))
    async with asyncio.timeout(30):
        body = await read_all(reader)
    assert decoded_text(body) == expected_text("read to the end", 6000)
    for stream in unread:
        stream.reset()


async def test_no_response_head_within_the_first_byte_timeout(sim_factory, pools):
    """The simulator generates one answer at a time: the second request
    waits there without a response head, past the first-byte timeout."""
    sim = await sim_factory(dataclasses.replace(FAST, max_concurrency=1))
    pool = pools(sim, max_connections=1, first_byte_timeout=1.0)
    holder = await pool.open(chat_request("holds the generator", ttft_ms=0, itl_ms=60_000))
    assert await holder.read()
    waiting = await pool.open(chat_request("waits for it"))
    async with asyncio.timeout(10):  # generous: the point is "at the deadline, not never"
        with pytest.raises(UpstreamTimeout, match="no response headers"):
            await waiting.head()
        with pytest.raises(UpstreamTimeout):
            await waiting.read()
    holder.reset()
    after = await pool.open(chat_request("the connection goes on"))
    assert decoded_text(await read_all(after)) == expected_text("the connection goes on", 16)


async def test_the_first_byte_timeout_ends_with_the_first_data(fast_sim, pools):
    """Once data came, gaps longer than the first-byte timeout are the idle
    timeout's business (none here), not a late first-byte deadline."""
    pool = pools(fast_sim, max_connections=1, first_byte_timeout=1.0, idle_timeout=None)
    stream = await pool.open(chat_request("slow but steady", ttft_ms=0, itl_ms=1300, tokens=3))
    assert decoded_text(await read_all(stream)) == expected_text("slow but steady", 3)


async def test_a_connection_draining_after_goaway_does_not_block_new_streams(fast_sim, pools):
    """With max_connections=1, a GOAWAY'd connection still finishing a long
    stream must not stop the pool from opening the next connection."""
    pool = pools(fast_sim, max_connections=1)
    long = await pool.open(chat_request("still streaming", itl_ms=20, tokens=500))
    assert await long.read()
    last = await pool.open(chat_request("last one here", goaway="graceful"))
    assert decoded_text(await read_all(last)) == expected_text("last one here", 16)
    async with asyncio.timeout(2):
        nxt = await pool.open(chat_request("on a new connection"))
        assert decoded_text(await read_all(nxt)) == expected_text("on a new connection", 16)
    assert long.error is None  # the draining connection's stream goes on
    long.reset()


async def test_a_woken_waiter_that_is_cancelled_passes_the_slot_on(sim_factory, pools):
    sim = await sim_factory(dataclasses.replace(FAST, max_concurrent_streams=1))
    pool = pools(sim, max_connections=1)
    holder = await pool.open(chat_request("holds the only slot", ttft_ms=60_000))
    first = asyncio.ensure_future(pool.open(chat_request("first waiter")))
    second = asyncio.ensure_future(pool.open(chat_request("second waiter")))
    await asyncio.sleep(0)  # one loop step: both reach their capacity wait
    assert len(pool._waiters) == 2
    holder.reset()  # wakes the first waiter...
    first.cancel()  # ...which leaves before taking the slot
    stream = await asyncio.wait_for(second, 2)
    assert decoded_text(await read_all(stream)) == expected_text("second waiter", 16)
    with pytest.raises(asyncio.CancelledError):
        await first
