"""The pooled HTTP/2 client against the simulator, over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time

import pytest

from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer
from gateway.upstream.base import ResponseStream, UpstreamRequest
from gateway.upstream.errors import ConnectionLost, StreamRefused, StreamReset, TransportTimeout
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.h2.stream import MAX_SENDS
from gateway.upstream.providers import get_provider
from tests.integration.flooding_h2_peer import deaf_h2_peer, ping
from tests.integration.h2_pools import h2_pool
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
        opened.append(h2_pool(sim.url, **kwargs))
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
    has them: every idle stream would hold its own copy."""
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
    with pytest.raises(StreamReset):
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
    """The wait for window to send a request body is the pool's, bounded by
    its slot timeout on either of its paths (the first open connects, the
    second finds a slot free), also when the peer has already answered with
    HEADERS and DATA. The peer is a bare h2 server that grants no stream
    window (SETTINGS_INITIAL_WINDOW_SIZE 0, RFC 9113 §6.5.2) and never a
    WINDOW_UPDATE."""
    peer_answers = quiet_h2_peer(
        head=answers_early, first_data=b"data: {}\n\n" if answers_early else None, initial_window_size=0
    )
    async with peer_answers as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", slot_timeout=0.3)
        try:
            for attempt in range(2):
                assert pool.connection_count() == attempt  # 0: connects first; 1: a slot free
                with pytest.raises(TransportTimeout, match="no window for the request body"):
                    # Bounded here too, so a wait nothing ends fails the test
                    # rather than hanging it (generous: the deadline is 0.3 s).
                    await asyncio.wait_for(pool.open(chat_request(f"no window for me {attempt}")), 5)
                # RST_STREAM for each: the peer holds nothing open.
                assert await asyncio.wait_for(peer.resets.get(), 5) == 2 * attempt + 1
        finally:
            await pool.aclose()  # the peer reads the end of the connection and stops


@pytest.mark.parametrize("turn_away", ["close", "silent"])
async def test_a_failed_extra_connection_leaves_the_request_waiting_for_a_slot(turn_away):
    """Connection 1 takes one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS
    1) and is busy; a second request makes the pool open connection 2, which
    the server turns away as one at its connection limit does: closed at
    once, or accepted and silent until the 0.3 s connect timeout. The
    request does not fail with that connect: it waits for a slot, and takes
    connection 1's when the first stream lets it go. No third connection is
    tried meanwhile (the spread back-off)."""
    peer_at_its_limit = quiet_h2_peer(max_concurrent_streams=1, serve_connections=1, turn_away=turn_away)
    async with peer_at_its_limit as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", connect_timeout=0.3, slot_timeout=10.0)
        try:
            first = await pool.open(chat_request("first"))
            assert (await first.head()).status == 200
            second = asyncio.ensure_future(pool.open(chat_request("second")))
            # Generous bounds: the connect fails at once or after 0.3 s.
            assert await asyncio.wait_for(peer.turned_away.get(), 5) == 2
            # The peer may be done with connection 2 before the pool has seen
            # it fail: wait until the pool has, and the request has looked
            # again (one loop step): a third connect would be under way now.
            async with asyncio.timeout(5):
                while pool._connecting is not None:  # noqa: ASYNC110 - no event of its own
                    await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert pool._connecting is None and len(pool._waiters) == 1 and not second.done()
            first.release()  # RST_STREAM: connection 1's slot is free
            assert await asyncio.wait_for(peer.resets.get(), 5) == 1
            stream = await asyncio.wait_for(second, 5)
            assert (await stream.head()).status == 200
            assert peer.requests == [1, 3]  # both on connection 1
            assert peer.connections == 2 and pool.connection_count() == 1
            stream.release()
        finally:
            await pool.aclose()


async def test_no_connection_is_opened_to_spread_streams_for_a_second_after_one_failed():
    """The server serves one connection and closes every later one, as one
    at its connection limit does. The second stream on connection 1 opens
    connection 2 in the background to spread streams; it fails. For a
    second after that (the spread back-off) further streams go to
    connection 1 and no connection is tried; then spreading resumes."""
    loop = asyncio.get_running_loop()
    async with quiet_h2_peer(serve_connections=1, turn_away="close") as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=4)
        streams: list[ResponseStream] = []
        try:
            streams.append(await pool.open(chat_request("first")))
            streams.append(await pool.open(chat_request("second")))
            spreading = pool._connecting
            assert spreading is not None  # connection 1 carries a stream
            assert await asyncio.wait_for(peer.turned_away.get(), 5) == 2
            # Its done callback (the pool's) runs before this wait returns.
            await asyncio.wait_for(asyncio.wait([spreading]), 5)
            failed_at = loop.time()
            assert pool._connecting is None and pool.connection_count() == 1

            for n in range(3):
                # open() does not yield between the pick and the HEADERS: a
                # connect started by the pick would still be under way.
                streams.append(await pool.open(chat_request(f"backing off {n}")))
                assert pool._connecting is None
            assert peer.connections == 2

            # The back-off itself is under test: wait it out.
            await asyncio.sleep(failed_at + 1.0 + 0.05 - loop.time())
            streams.append(await pool.open(chat_request("spread again")))
            assert pool._connecting is not None
            assert await asyncio.wait_for(peer.turned_away.get(), 5) == 3
            for stream in streams:
                assert (await stream.head()).status == 200
            # Every stream went to connection 1, in order.
            assert peer.requests == [1, 3, 5, 7, 9, 11]
            assert peer.connections == 3 and pool.connection_count() == 1
        finally:
            for stream in streams:
                stream.reset()
            await pool.aclose()


async def test_each_request_of_a_burst_is_written_as_it_is_opened():
    """Requests opened in one loop iteration (a burst of clients read at
    once) are each written when opened, not together at the iteration's
    end: the upstream starts on the first while the rest are opened. Each
    open counts the writes the peer has received, in the same step."""
    async with quiet_h2_peer(head=False) as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1)
        streams: list[ResponseStream] = []

        async def open_and_count(prompt: str) -> int:
            streams.append(await pool.open(chat_request(prompt)))
            return peer.segments_received()

        try:
            streams.append(await pool.open(chat_request("connects first")))
            async with asyncio.timeout(5):
                while peer.requests != [1]:  # noqa: ASYNC110 - the peer has no event for it
                    await asyncio.sleep(0.001)
            before = peer.segments_received()
            counts = await asyncio.gather(*(open_and_count(f"burst {n}") for n in range(3)))
            # One write each (HEADERS and body together), each before the next open.
            assert counts == [before + 1, before + 2, before + 3]
            async with asyncio.timeout(5):
                while peer.requests != [1, 3, 5, 7]:  # noqa: ASYNC110 - as above
                    await asyncio.sleep(0.001)
        finally:
            for stream in streams:
                stream.reset()
            await pool.aclose()


async def test_an_upload_that_fills_the_write_buffer_does_not_stop_reading():
    """The peer grants all the window HTTP/2 allows and reads nothing: an
    8 MB request body fills the connection's write buffer past its
    high-water mark. The connection goes on reading (the other streams'
    tokens must not wait for an upload), so the PINGs the peer sends
    meanwhile are read, and their ACKs queue behind the body, fewer than
    the flood limit. Once the peer reads, it gets each ACK once and the
    request its answer."""
    async with deaf_h2_peer() as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1)
        try:
            body = b"x" * 8_000_000
            stream = await pool.open(UpstreamRequest("POST", "/v1/upload", (), body))
            # The body's frames leave in the flush queued for the end of
            # this loop iteration (connection.py, _flush_soon): let it run.
            await asyncio.sleep(0)
            (connection,) = pool._connections
            transport = connection._transport
            assert transport is not None
            assert transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
            assert transport.is_reading()
            for number in range(10):
                peer.pings.put_nowait(ping(number))
            peer.listen.set()
            async with asyncio.timeout(10):  # generous: 8 MB over loopback
                assert (await stream.head()).status == 200
                acks = [await peer.ping_acks.get() for _ in range(10)]
            assert acks == [number.to_bytes(8, "big") for number in range(10)]
            assert peer.ping_acks.empty() and peer.body_bytes == len(body)
            assert transport.get_write_buffer_size() == 0
            assert connection.is_usable
            stream.release()
        finally:
            await pool.aclose()


async def test_a_read_cancelled_while_waiting_loses_nothing(fast_sim, pools):
    """``read()`` is a coroutine that takes data only when it returns: one
    cancelled while it waits leaves what arrives for the next read, and the
    body still reads exact."""
    pool = pools(fast_sim)
    prompt = "cancel my reads"
    stream = await pool.open(chat_request(prompt, ttft_ms=0, itl_ms=20, tokens=10))
    assert (await stream.head()).status == 200
    parts = []
    cancelled = 0
    while True:
        read = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0)  # the read starts, and waits if nothing is buffered
        if not read.done():
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            cancelled += 1
            await asyncio.sleep(0.03)  # a token arrives meanwhile
            continue
        if not (data := read.result()):
            break
        parts.append(data)
    assert cancelled > 0
    assert decoded_text(b"".join(parts)) == expected_text(prompt, 10)


async def test_a_refused_stream_is_sent_again_on_a_new_connection_a_bounded_number_of_times(
    fast_sim, pools
):
    """The simulator refuses this request wherever it arrives, with a GOAWAY
    whose last-stream-id is below its stream (RFC 9113 §6.8: not processed).
    The pool sends it again on a new connection each time, MAX_SENDS times
    in all, then the consumer gets the refusal; the next request goes to a
    fresh connection and is answered."""
    pool = pools(fast_sim)
    warmup = await pool.open(chat_request("warm up"))
    await read_all(warmup)
    stream = await pool.open(chat_request("refuse me", goaway="refuse"))
    with pytest.raises(StreamRefused):
        await stream.head()
    refused = await fast_sim.log.wait_for(MAX_SENDS, outcome="failed")
    assert len({r.connection_id for r in refused}) == MAX_SENDS
    after = await pool.open(chat_request("after goaway"))
    assert decoded_text(await read_all(after)) == expected_text("after goaway", 16)
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
    with pytest.raises(ConnectionLost):
        await read_all(victim)
    with pytest.raises(ConnectionLost):
        await read_all(bystander)
    assert pool.connection_count() == 0
    fresh = await pool.open(chat_request("fresh"))
    assert decoded_text(await read_all(fresh)) == expected_text("fresh", 16)
    assert pool.connection_count() == 1


async def test_an_upstream_reset_after_some_tokens_is_reported(fast_sim, pools):
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("reset by peer", reset_after=3))
    with pytest.raises(StreamReset):
        await read_all(stream)
    # The connection survives a stream reset.
    other = await pool.open(chat_request("still fine"))
    assert decoded_text(await read_all(other)) == expected_text("still fine", 16)
    assert pool.connection_count() == 1


async def test_what_arrived_before_an_upstream_reset_is_read_before_the_reset(fast_sim, pools):
    """DATA received before the peer's RST_STREAM was sent by it and is
    valid (RFC 9113 §6.4 ends the stream, not what it carried): the reader
    gets every byte of it, then the reset. The simulator sends its three
    tokens and the reset back to back, so they arrive before the first read."""
    pool = pools(fast_sim)
    stream = await pool.open(chat_request("reset right after", reset_after=3, itl_ms=0))
    await stream.head()
    received = []
    with pytest.raises(StreamReset):
        while data := await stream.read():
            received.append(data)
    deltas = get_provider("openai").decoder().feed(b"".join(received))  # no [DONE]: not closed
    assert "".join(d.text for d in deltas) == expected_text("reset right after", 3)


async def test_abandoned_streams_do_not_leak_the_connection_window(fast_sim, pools):
    """Reset 300 streams that each received data nobody read: the
    connection window must come back (h2 counts their DATA against it: everything must be credited)."""
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
    (connection,) = pool._connections
    assert connection._core._owed_total == 0


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


async def test_streams_spread_over_the_connections_so_a_loss_takes_only_a_share(fast_sim, pools):
    """40 streams with max_connections=4 go to the connection carrying the
    fewest, a new one opening in the background while every one carries
    some: 4 connections share them. A connection killed under them fails
    its own streams only."""
    pool = pools(fast_sim, max_connections=4)
    waiting = []
    for i in range(40):
        waiting.append(await pool.open(chat_request(f"spread {i}", ttft_ms=60_000)))
        await fast_sim.log.wait_for_arrivals(i + 1)
    assert pool.connection_count() == 4
    per_connection: dict[int, int] = {}
    for record in fast_sim.log.records:
        per_connection[record.connection_id] = per_connection.get(record.connection_id, 0) + 1
    # Even, give or take the streams placed while the other connections
    # were still connecting.
    assert len(per_connection) == 4 and max(per_connection.values()) <= 30, per_connection
    victim = await pool.open(chat_request("victim", ttft_ms=0, itl_ms=1, tokens=50, kill_after=2))
    victims_connection = (await fast_sim.log.wait_for_arrivals(41))[-1].connection_id
    with pytest.raises(ConnectionLost):
        await read_all(victim)
    lost = [stream for stream in waiting if isinstance(stream.error, ConnectionLost)]
    assert len(lost) == per_connection[victims_connection] <= 30
    assert all(stream.error is None for stream in waiting if stream not in lost)
    for stream in waiting:
        stream.reset()
