"""The gateway in front of an HTTP/2 upstream that misbehaves on purpose
(tests/integration/faulty_h2_peer.py), over real sockets: GOAWAY after N
requests costs no request, whether the peer ends its connections as RFC
9113 §6.8 says or as hypercorn does; REFUSED_STREAM is sent again; a
connection lost, a GOAWAY with an error code,
a protocol error or a dead peer ends every coalesced subscriber with the
in-stream error, never with [DONE]."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, SettingsFrame

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.state import STATE, GatewayState
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.errors import ConnectionLost
from gateway.upstream.h2.protocol import MAX_UNSENT_ACKS
from gateway.upstream.h2.stream import MAX_SENDS, H2ResponseStream
from tests.integration.faulty_h2_peer import FaultyPeer, answer_text, chunk, faulty_h2_peer
from tests.integration.flooding_h2_peer import FloodingPeer, flooding_h2_peer
from tests.integration.h2_pools import h2_pool
from tests.integration.malformed_h2_peer import MalformedPeer, malformed_h2_peer
from tests.integration.malformed_h2_peer import answer_text as three_tokens
from tests.integration.metrics_scrape import scrape
from tests.integration.sse_frames import Frame, FrameReader, openai_text

DONE = b"data: [DONE]\n\n"


def chat(prompt: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}


def request(prompt: str) -> UpstreamRequest:
    body = json.dumps(chat(prompt)).encode()
    return UpstreamRequest("POST", "/v1/chat/completions", (("content-type", "application/json"),), body)


async def read_all(stream: H2ResponseStream) -> bytes:
    parts = []
    while data := await stream.read():
        parts.append(data)
    return b"".join(parts)


@asynccontextmanager
async def gateway_on(
    peer: FaultyPeer | MalformedPeer | FloodingPeer, **settings: Any
) -> AsyncIterator[tuple[GatewayState, str]]:
    """The gateway with the peer as its upstream over h2c; yields its state
    and its /v1 URL."""
    async with running_gateway(
        Settings(
            host="127.0.0.1",
            port=0,
            upstream_url=f"http://127.0.0.1:{peer.port}/v1",
            upstream_protocol="h2c",
            **settings,
        )
    ) as (app, url):
        yield app[STATE], url + "/v1"


async def thirty_clients_twenty_requests_each(v1: str) -> list[tuple[int, str, bytes]]:
    """600 streamed requests, 30 clients each sending its next as the last
    ends: each one's status, answer text and last frame."""
    results: list[tuple[int, str, bytes]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def client(number: int) -> None:
            for request in range(20):
                async with http.post(v1 + "/chat/completions", json=chat(f"c{number} r{request}")) as r:
                    frames = await FrameReader(r).rest()
                results.append((r.status, openai_text(frames), frames[-1].raw))

        await asyncio.gather(*(client(number) for number in range(30)))
    return results


async def test_goaway_after_every_50_requests_fails_no_request():
    """600 requests, 30 at a time, to an upstream whose connections serve 50
    requests each and refuse the next with GOAWAY (as hypercorn does at
    1,000): every refused stream is sent again on another connection, and
    every request gets its whole answer and [DONE]. RFC 9113 §6.8."""
    async with faulty_h2_peer(goaway_after=50) as peer, gateway_on(peer) as (_, v1):
        results = await thirty_clients_twenty_requests_each(v1)
    failures = [result for result in results if result != (200, answer_text(5), DONE)]
    print(f"{peer.goaways} GOAWAYs, {peer.unanswered} streams refused and sent again, "
          f"{peer.connections} connections, {len(failures)} failures")
    assert len(results) == 600 and failures == []
    # Up to four connections (UPSTREAM_MAX_CONNECTIONS) end the run short
    # of their quota; the others all reached it.
    assert peer.goaways >= 600 // 51 - 4
    # Each GOAWAY refused at least the request that triggered it, and each
    # refused request was answered after all.
    assert peer.unanswered >= peer.goaways
    assert peer.requests == 600 + peer.unanswered


async def test_no_connection_reaches_a_hypercorn_style_request_limit():
    """An upstream that, like hypercorn, drops the answers in flight when a
    connection passes its request quota (50 here, 1,000 in hypercorn): the
    client opens at most 40 streams on a connection
    (upstream_max_streams_per_connection, 500 by default), so no connection
    ever reaches the quota, and 600 requests, 30 at a time, all complete."""
    peer_with_quota = faulty_h2_peer(goaway_after=50, goaway_style="hypercorn")
    async with peer_with_quota as peer, gateway_on(peer, upstream_max_streams_per_connection=40) as (_, v1):
        results = await thirty_clients_twenty_requests_each(v1)
    failures = [result for result in results if result != (200, answer_text(5), DONE)]
    print(f"{peer.connections} connections, {len(failures)} failures")
    assert len(results) == 600 and failures == []
    assert peer.goaways == 0 and peer.requests == 600
    assert peer.connections >= 600 // 40


async def test_a_hypercorn_style_quota_drops_the_streams_in_flight():
    """What the cap avoids: at its quota such a peer closes the connection
    under the streams in flight, all at or below its GOAWAY's last-stream-id
    (so possibly processed, and not sent again): each fails as a lost
    connection. With the cap at the quota, the next stream goes to a new
    connection and every stream completes."""
    for cap, expected in ((None, ["lost"] * 6), (5, ["ok"] * 6)):
        async with faulty_h2_peer(goaway_after=5, goaway_style="hypercorn", token_gap_s=0.2) as peer:
            pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1,
                           max_streams_per_connection=cap)
            try:
                streams = [await pool.open(request(f"in flight {i}")) for i in range(6)]
                outcomes = []
                for stream in streams:
                    try:
                        await read_all(stream)
                        outcomes.append("ok")
                    except ConnectionLost:
                        outcomes.append("lost")
            finally:
                await pool.aclose()
        assert outcomes == expected, cap
        assert peer.goaways == (1 if cap is None else 0)


async def test_a_connection_ended_with_its_preface_leaves_the_pool_free():
    """The upstream's first connection sends its SETTINGS and a GOAWAY (last
    stream 0, RFC 9113 §6.8) in one write: it ends before the pool could add
    it. With max_connections=1 it must not stay in the pool, closed, holding
    the only place: the request goes on a second connection and is
    answered, and so is the next."""
    async with faulty_h2_peer(goaway_at_once=1) as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1, slot_timeout=2.0)
        try:
            for prompt in ("first", "next"):
                stream = await pool.open(request(prompt))
                assert await read_all(stream) == b"".join(chunk(f"t{i} ") for i in range(5)) + DONE
            assert pool.connection_count() == 1
        finally:
            await pool.aclose()
    assert peer.connections == 2 and peer.goaways == 1 and peer.requests == 2


async def test_a_peer_that_ends_every_connection_with_its_preface_fails_the_open():
    """Every connection ends with its preface: the request is tried on
    MAX_SENDS new connections, then fails as a lost connection, at once,
    not after the slot timeout, and not on connection after connection."""
    async with faulty_h2_peer(goaway_at_once=100) as peer:
        pool = h2_pool(f"http://127.0.0.1:{peer.port}", max_connections=1, slot_timeout=30.0)
        try:
            with pytest.raises(ConnectionLost, match="before it took a stream"):
                async with asyncio.timeout(10):  # generous: the slot timeout is 30 s
                    await pool.open(request("turned away"))
            assert pool.connection_count() == 0
        finally:
            await pool.aclose()
    assert peer.connections == MAX_SENDS and peer.requests == 0


async def test_refused_streams_are_sent_again_and_answered():
    """The upstream refuses the first two sends of a request with
    RST_STREAM(REFUSED_STREAM) (RFC 9113 §8.7: not processed): the client
    sends it again, and the third send is answered in full."""
    async with faulty_h2_peer(refuse_first=2) as peer, gateway_on(peer) as (_, v1):
        async with aiohttp.ClientSession() as http:
            async with http.post(v1 + "/chat/completions", json=chat("refused twice")) as response:
                frames = await FrameReader(response).rest()
    assert response.status == 200
    assert openai_text(frames) == answer_text(5) and frames[-1].raw == DONE
    assert peer.refused == 2 and peer.requests == 3


async def test_a_request_refused_at_every_send_is_counted_as_refused():
    """An upstream that refuses every stream (RST_STREAM(REFUSED_STREAM),
    RFC 9113 §8.7): the request ends with upstream_stream_refused after
    both attempts of the one-upstream table, each sent MAX_SENDS times, and
    gateway_upstream_requests_total counts each attempt as status="refused",
    none as "error" (docs/routing.md, "Metrics")."""
    async with faulty_h2_peer(refuse_first=1_000) as peer, gateway_on(peer) as (_, v1):
        async with aiohttp.ClientSession() as http:
            async with http.post(v1 + "/chat/completions", json=chat("refused")) as response:
                frames = await FrameReader(response).rest()
            metrics = await scrape(http, v1.removesuffix("/v1"))
    assert in_stream_error(frames) == "upstream_stream_refused"
    assert peer.refused == peer.requests == 2 * MAX_SENDS
    counted = {sample.labels["status"]: sample.value
               for sample in metrics.matching("gateway_upstream_requests_total")}
    assert counted == {"refused": 2.0}


async def first_tokens(http: aiohttp.ClientSession, v1: str, prompt: str, text: str) -> FrameReader:
    """A streaming request, read until ``text`` has come."""
    response = await http.post(v1 + "/chat/completions", json=chat(prompt))
    assert response.status == 200
    reader = FrameReader(response)
    while openai_text(reader.frames) != text:
        assert await reader.next() is not None
    return reader


def in_stream_error(frames: list[Frame]) -> str:
    assert all(frame.raw != DONE for frame in frames)
    code = frames[-1].json()["error"]["code"]
    assert isinstance(code, str)
    return code


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("kill", "upstream_connection_lost"),
        ("goaway_error", "upstream_connection_lost"),
        ("protocol_error", "upstream_connection_lost"),
        ("silent", "upstream_connection_lost"),
    ],
)
async def test_coalesced_subscribers_of_a_failed_connection_each_get_the_error(fault, code):
    """20 clients share one upstream stream (coalesced); two tokens in, its
    connection fails (TCP abort, GOAWAY(INTERNAL_ERROR), a frame HTTP/2
    forbids, a connection error of which the stream is no cause, or a peer
    that stops answering anything, PINGs included).
    Each client ends with the in-stream error and none with [DONE]; the
    upstream saw one request."""
    peer_fails = faulty_h2_peer(fault=fault, tokens=10, tokens_before_fault=2, wait_for_go=True)
    async with peer_fails as peer, gateway_on(
        peer, upstream_ping_interval_s=0.2, upstream_ping_timeout_s=0.3
    ) as (_, v1):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            readers = [await first_tokens(http, v1, "shared", "t0 t1 ") for _ in range(20)]
            peer.go.set()
            async with asyncio.timeout(20):  # generous: a dead peer is found in 0.5 s
                endings = await asyncio.gather(*(reader.rest() for reader in readers))
            for reader in readers:
                reader.response.close()
    assert [in_stream_error(frames) for frames in endings] == [code] * 20
    assert [openai_text(frames) for frames in endings] == ["t0 t1 "] * 20
    assert peer.requests == 1


async def test_a_dead_peer_is_found_by_ping_long_before_the_idle_timeout():
    """An upstream that stops sending anything, PING ACKs included, without
    closing the connection: with the idle timeout at its 30 s default and
    PINGs after 0.2 s of silence, unanswered for 0.3 s, the stream ends with
    upstream_connection_lost within about half a second. (The defaults are
    a PING after 10 s, lost 5 s later: 15 s at most, half the idle timeout.)"""
    peer_goes_silent = faulty_h2_peer(fault="silent", tokens=10, tokens_before_fault=2, wait_for_go=True)
    async with peer_goes_silent as peer, gateway_on(
        peer, upstream_ping_interval_s=0.2, upstream_ping_timeout_s=0.3
    ) as (state, v1):
        assert state.settings.upstream_idle_timeout_ms == 30_000
        async with aiohttp.ClientSession() as http:
            reader = await first_tokens(http, v1, "then silence", "t0 t1 ")
            peer.go.set()
            silent_at = time.monotonic()
            async with asyncio.timeout(20):
                frames = await reader.rest()
            found_after = time.monotonic() - silent_at
            reader.response.close()
    print(f"dead peer found after {found_after * 1000:.0f} ms")
    assert in_stream_error(frames) == "upstream_connection_lost"
    assert frames[-1].json()["error"]["message"].startswith("the connection to the upstream was lost")
    # Far below the idle timeout (generous for a loaded machine: the point
    # is "not 30 s").
    assert found_after < 10


def idle(state: GatewayState) -> tuple[int, list[int]]:
    """Streams open at the gateway, and attempts in flight per upstream."""
    return state.active_streams, [upstream.in_flight for upstream in state.router.upstreams]


@pytest.mark.parametrize(
    "head",
    [
        [("content-type", "text/event-stream")],
        [(":status", "abc")],
        [(":status", "200"), ("Connection", "x")],
    ],
    ids=["no-status", "status-abc", "upper-case-name"],
)
async def test_a_malformed_head_fails_its_own_stream_only(head):
    """Stream A is streaming on connection 1 when stream M, next to it, gets
    a malformed response head (RFC 9113 §8.1.1). M alone is reset with
    PROTOCOL_ERROR and its client gets 502 upstream_protocol_error (the
    upstream answered: not retried); A reads its whole answer and [DONE] on
    the same connection."""
    one_connection = {"upstream_max_connections": 1}  # M goes next to A
    async with malformed_h2_peer(bad_head=head) as peer, gateway_on(peer, **one_connection) as (state, v1):
        async with aiohttp.ClientSession() as http:
            reader = await first_tokens(http, v1, "A", "t0 ")
            async with http.post(v1 + "/chat/completions", json={**chat("M"), "stream": False}) as response:
                body = await response.json()
            async with asyncio.timeout(10):  # generous: A's rest follows M's reset at once
                frames = await reader.rest()
            reader.response.close()
        assert response.status == 502 and body["error"]["code"] == "upstream_protocol_error"
        assert openai_text(frames) == three_tokens() and frames[-1].raw == DONE
        assert peer.resets == [(1, 3, ErrorCodes.PROTOCOL_ERROR)]
        assert peer.connections == 1 and peer.requests == 2
        assert idle(state) == (0, [0])


async def test_a_connection_error_fails_its_unanswered_streams_as_lost_and_they_are_retried():
    """Two requests wait for their answers on connection 1 when the upstream
    sends a frame HTTP/2 forbids (SETTINGS on a stream, §6.5), a connection
    error (§5.4.1) neither request caused: each fails as the connection lost,
    not as a protocol error, so each is sent again, on connection 2, and
    answered in full."""
    peer_breaks_the_protocol = malformed_h2_peer(connection_error=True, hold=2)
    async with peer_breaks_the_protocol as peer, gateway_on(peer, upstream_max_connections=1) as (state, v1):
        async with aiohttp.ClientSession() as http:

            async def ask(prompt: str) -> tuple[int, list[Frame]]:
                async with http.post(v1 + "/chat/completions", json=chat(prompt)) as response:
                    return response.status, await FrameReader(response).rest()

            async with asyncio.timeout(10):  # generous: both end within milliseconds
                answers = await asyncio.gather(ask("first"), ask("second"))
        for status, frames in answers:
            assert status == 200
            assert openai_text(frames) == three_tokens() and frames[-1].raw == DONE
        assert peer.connections == 2 and peer.requests == 4
        assert idle(state) == (0, [0])


@pytest.mark.parametrize(
    "frame", [PingFrame(0, opaque_data=b"flooding").serialize(), SettingsFrame(0).serialize()],
    ids=["PING", "SETTINGS"],
)
@pytest.mark.parametrize("after_first_token", [False, True], ids=["unanswered", "answering"])
async def test_a_flood_ends_its_connection_and_an_unanswered_request_is_retried(frame, after_first_token):
    """The upstream stops reading and sends twice MAX_UNSENT_ACKS PING (or
    empty SETTINGS) frames in one write, each asking for an acknowledgement
    (RFC 9113 §10.5). The gateway ends that connection
    (GOAWAY(ENHANCE_YOUR_CALM)) at once, not after its 15 s PING liveness:
    a request not answered yet is sent again on a new connection and
    answered in full; one that had its first token ends with
    upstream_connection_lost, and the next request is answered in full."""
    flood = flooding_h2_peer(frame=frame, count=2 * MAX_UNSENT_ACKS, after_first_token=after_first_token)
    async with flood as peer, gateway_on(peer, upstream_max_connections=1) as (state, v1):
        assert state.settings.upstream_ping_interval_s == 10
        async with aiohttp.ClientSession() as http:

            async def ask(prompt: str) -> tuple[int, list[Frame]]:
                async with http.post(v1 + "/chat/completions", json=chat(prompt)) as response:
                    return response.status, await FrameReader(response).rest()

            # Generous: the flood is found in the read that brings it.
            async with asyncio.timeout(5):
                status, frames = await ask("flooded")
                if after_first_token:
                    assert status == 200 and in_stream_error(frames) == "upstream_connection_lost"
                    assert openai_text(frames) == "t0 "
                    status, frames = await ask("next")
        assert status == 200 and openai_text(frames) == "t0 t1 t2 " and frames[-1].raw == DONE
        assert peer.flooded.is_set() and peer.connections == 2
        assert idle(state) == (0, [0])
        assert state.router.upstreams[0].transport.connection_count() == 1
