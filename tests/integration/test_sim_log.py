"""The request log as the gateway's tests see it: outcomes, times, admin endpoints."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from gateway.sim import SimProfile, SimServer, prompt_digest
from tests.conftest import SimFactory
from tests.integration.h2_test_client import PROTOCOLS, H2TestClient, send_over

CHAT = "/v1/chat/completions"
LONG = {"x-sim-tokens": "100000"}
#: How soon after the client's reset or close the record must have ended:
#: milliseconds on an idle machine, a generous ceiling on a loaded one, and
#: still far below the minutes a LONG answer would run on its own.
ENDED_WITHIN_S = 2.0


def _request(text: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "stream": True, **extra}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_complete_record(sim: SimServer, protocol: str) -> None:
    before = time.monotonic()
    await send_over(protocol, sim.port, "POST", CHAT, payload=_request("hi", max_tokens=3))
    [record] = sim.log.records
    assert record.id == 1 and record.path == CHAT and record.http_version == protocol
    assert record.prompt_sha == prompt_digest([{"role": "user", "content": "hi"}]).hex()
    assert record.first_token is not None and record.end is not None
    assert before <= record.arrival <= record.first_token <= record.end <= time.monotonic()
    assert record.end_wall is not None and record.arrival_wall <= record.end_wall
    assert (record.outcome, record.tokens_sent, record.status) == ("complete", 3, 200)


async def test_h2_reset_is_logged_within_milliseconds(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    exchange = client.start_json(CHAT, _request("cancel me"), headers=LONG)
    await asyncio.wait_for(exchange.data_arrived.wait(), 5)
    sent_at = time.monotonic()
    client.reset(exchange.stream_id)
    [record] = await sim.log.wait_for(1, outcome="reset")
    assert record.end is not None
    # Timed in the server's StreamReset callback: same machine, same clock.
    assert 0 <= record.end - sent_at < ENDED_WITHIN_S
    assert record.tokens_sent >= 0
    await client.close()


async def test_h2_connection_loss_is_a_disconnect_for_every_stream(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    exchanges = [client.start_json(CHAT, _request(f"q{i}"), headers=LONG) for i in range(3)]
    await asyncio.gather(*(asyncio.wait_for(e.data_arrived.wait(), 5) for e in exchanges))
    assert client.transport is not None
    closed_at = time.monotonic()
    client.transport.abort()
    records = await sim.log.wait_for(3, outcome="disconnect")
    assert all(r.end is not None and 0 <= r.end - closed_at < ENDED_WITHIN_S for r in records)
    assert all(r.http_version == "HTTP/2" for r in records)


async def test_http1_client_leaving_is_a_disconnect(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(sim.url + "/chat/completions", json=_request("x"), headers=LONG)
        await response.content.readany()
        closed_at = time.monotonic()
        response.close()  # drops the connection mid-stream
    [record] = await sim.log.wait_for(1, outcome="disconnect")
    assert record.end is not None and 0 <= record.end - closed_at < ENDED_WITHIN_S
    assert record.http_version == "HTTP/1.1"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_admin_requests_endpoints(sim: SimServer, protocol: str) -> None:
    await send_over(protocol, sim.port, "POST", CHAT, payload=_request("a", max_tokens=1))
    listed = await send_over(protocol, sim.port, "GET", "/admin/requests")
    [entry] = listed.json()["requests"]
    assert entry == sim.log.records[0].to_json()
    assert set(entry) >= {
        "id", "path", "format", "http_version", "stream", "prompt_sha", "arrival",
        "first_token", "end", "outcome", "tokens_sent", "status", "authorization",
        "arrival_wall", "end_wall",
    }
    cleared = await send_over(protocol, sim.port, "DELETE", "/admin/requests")
    assert cleared.status == 200 and sim.log.records == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_admin_wait_long_polls(sim: SimServer, protocol: str) -> None:
    waiting = asyncio.create_task(
        send_over(protocol, sim.port, "GET", "/admin/requests/wait?count=2&outcome=complete")
    )
    for text in ("one", "two"):
        await send_over(protocol, sim.port, "POST", CHAT, payload=_request(text, max_tokens=2))
    reply = await asyncio.wait_for(waiting, 5)
    assert reply.status == 200
    assert [r["outcome"] for r in reply.json()["requests"]] == ["complete", "complete"]

    timeout = await send_over(
        protocol, sim.port, "GET", "/admin/requests/wait?count=1&outcome=reset&timeout_ms=30"
    )
    assert timeout.status == 408 and timeout.json()["error"]["code"] == "timeout"
    bad = await send_over(protocol, sim.port, "GET", "/admin/requests/wait?outcome=pending")
    assert bad.status == 400


async def test_both_protocols_on_one_port(sim: SimServer) -> None:
    await asyncio.gather(
        send_over("HTTP/1.1", sim.port, "POST", CHAT, payload=_request("a", max_tokens=2)),
        send_over("HTTP/2", sim.port, "POST", CHAT, payload=_request("b", max_tokens=2)),
    )
    assert sorted(r.http_version for r in sim.log.records) == ["HTTP/1.1", "HTTP/2"]


async def test_h2_settings_come_from_the_profile(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimProfile(max_concurrent_streams=7, initial_window_size=1000))
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    assert client.conn.remote_settings.max_concurrent_streams == 7
    # The smaller window comes in a SETTINGS frame of its own (RFC 9113 §6.9.2).
    while client.conn.remote_settings.initial_window_size != 1000:
        client.settings_received.clear()
        await asyncio.wait_for(client.settings_received.wait(), 5)
    await client.close()


async def test_concurrency_limit_queues_in_order(sim_factory: SimFactory) -> None:
    profile = SimProfile(ttft_ms=20, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0, tokens=2,
                         max_concurrency=1)
    sim = await sim_factory(profile)
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    # Started in one go: the streams arrive, and queue, in stream-id order.
    exchanges = [client.start_json(CHAT, _request(text)) for text in ("first", "second", "third")]
    await asyncio.gather(*(asyncio.wait_for(e.done.wait(), 5) for e in exchanges))
    await client.close()
    records = sim.log.records
    assert [r.outcome for r in records] == ["complete"] * 3
    for earlier, later in zip(records, records[1:], strict=False):
        assert later.first_token is not None and earlier.end is not None
        # The wait counts before the TTFT: a later one starts after the earlier ends.
        assert later.first_token >= earlier.end + 0.019


async def test_aclose_ends_streams_in_flight_and_leaves_no_task() -> None:
    sim = SimServer(SimProfile(ttft_ms=1, ttft_jitter_ms=0, itl_ms=5, itl_jitter_ms=0))
    await sim.start()
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    exchange = client.start_json(CHAT, _request("h2"), headers=LONG)
    await asyncio.wait_for(exchange.data_arrived.wait(), 5)
    async with aiohttp.ClientSession() as session:
        response = await session.post(sim.url + "/chat/completions", json=_request("h1"), headers=LONG)
        await response.content.readany()
        await sim.aclose()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await asyncio.wait_for(client.closed.wait(), 5)
    assert not exchange.ended
    assert sorted((r.http_version, r.outcome) for r in sim.log.records) == [
        ("HTTP/1.1", "disconnect"),
        ("HTTP/2", "disconnect"),
    ]


async def test_connection_ids_tell_connections_apart(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    for text in ("a", "b"):
        await client.post_json(CHAT, _request(text, max_tokens=1))
    await client.close()
    async with aiohttp.ClientSession() as session:
        for text in ("c", "d"):  # one keep-alive connection
            async with session.post(sim.url + "/chat/completions", json=_request(text, max_tokens=1)) as r:
                await r.read()
    await send_over("HTTP/1.1", sim.port, "POST", CHAT, payload=_request("e", max_tokens=1))
    ids = [r.connection_id for r in sim.log.records]
    assert ids[0] == ids[1] and ids[2] == ids[3]
    assert len({ids[0], ids[2], ids[4]}) == 3 and all(i >= 1 for i in ids)


async def test_wait_for_arrivals_sees_pending_requests(sim: SimServer) -> None:
    client = await H2TestClient.connect("127.0.0.1", sim.port)
    client.start_json(CHAT, _request("slow"), headers={"x-sim-ttft-ms": "5000"})
    [record] = await sim.log.wait_for_arrivals(1)
    assert record.outcome == "pending" and record.first_token is None
    await client.close()
    await sim.log.wait_for(1, outcome="disconnect")
