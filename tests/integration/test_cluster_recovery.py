"""Cluster mode when Redis forgets: real redis-server, two gateway processes
and one simulator (in this process, so its request log is the upstream's
truth).

A lease lost with Redis's data (FLUSHALL, a restart with an empty instance),
or never written because the stream started while Redis was down, comes back
at the owner's next renewal or right after its probe finds Redis back: a
request on another member then follows the live stream, and a cancel sent
to another member reaches it. The lease is 3 s here, so renewals come every
second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.cluster.directory import MEMBERS, Directory
from gateway.cluster.wire import Owner, decode_entry
from gateway.keys import prompt_key
from tests.integration.cluster_fixture import REDIS_SERVER, running_member, running_redis
from tests.integration.conftest import FAST_SIM
from tests.integration.test_cluster import Cluster, _stream_on, chat, meta_role

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

LEASE = {"CLUSTER_LEASE_MS": "3000"}
#: A ceiling on Redis getting the entries back: a renewal (1 s) or a probe
#: (1 s) and its write, with room for a loaded machine.
BACK_WITHIN_S = 5.0


@pytest.fixture
async def pair(tmp_path: Path, sim_factory) -> AsyncIterator[Cluster]:
    sim = await sim_factory(FAST_SIM)
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
        members = list(await asyncio.gather(
            *(stack.enter_async_context(running_member(sim.url, redis.url, LEASE)) for _ in range(2))
        ))
        yield Cluster(redis, sim, members)
        for number, member in enumerate(members):  # shown when a test fails
            print(f"-- member {number} ({member.url}) output:", *member.output, sep="\n")


async def _entries_back(cluster: Cluster, entry: str) -> Owner:
    """Once Redis names an owner for ``entry`` and lists every member again:
    that owner."""
    urls = {(await m.stats())["cluster"]["advertise_url"] for m in cluster.members}
    client = Redis.from_url(cluster.redis.url)
    try:
        async with asyncio.timeout(BACK_WITHIN_S):
            while True:
                value = await client.get(entry)
                listed = {url.decode() for url in await client.zrange(MEMBERS, 0, -1)}
                if value is not None and urls <= listed:
                    owner = decode_entry(value)
                    assert isinstance(owner, Owner)
                    return owner
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_a_live_stream_is_registered_again_after_redis_loses_its_data(pair, loss):
    owner, other = pair.members
    prompt = f"registered again after a {loss} [sim itl_ms=20 tokens=800]"
    entry = Directory.key(prompt_key(chat(prompt), tenant=None))
    async with aiohttp.ClientSession() as http:
        first, reader = await _stream_on(http, owner, prompt, 1)
        request_id = next(f.json()["request_id"] for f in reader.frames if f.event == "meta")
        assert meta_role(reader.frames) == "leader"
        if loss == "flushall":
            client = Redis.from_url(pair.redis.url)
            await client.flushall()
            await client.aclose()
        else:
            await pair.redis.stop()
            await pair.redis.start()
        named = await _entries_back(pair, entry)
        assert named.url == (await owner.stats())["cluster"]["advertise_url"]
        # The other member follows the live stream: no second upstream call.
        second, follower = await _stream_on(http, other, prompt, 1)
        assert meta_role(follower.frames) == "follower"
        # A cancel sent to the other member reaches the owner's request.
        async with http.post(other.url + f"/v1/requests/{request_id}/cancel") as cancel:
            assert cancel.status == 202
        rest = await reader.rest()
        assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "cancelled"
        first.release()
        second.close()
    assert len(pair.calls()) == 1


async def test_a_stream_started_while_redis_was_down_is_registered_once_it_is_back(pair):
    owner, other = pair.members
    prompt = "started during the outage [sim itl_ms=20 tokens=800]"
    entry = Directory.key(prompt_key(chat(prompt), tenant=None))
    await pair.redis.stop()
    async with aiohttp.ClientSession() as http:
        first, reader = await _stream_on(http, owner, prompt, 1)
        assert meta_role(reader.frames) == "leader"
        await owner.wait_metric("gateway_cluster_up", 0)  # served locally
        await pair.redis.start()
        named = await _entries_back(pair, entry)
        assert named.url == (await owner.stats())["cluster"]["advertise_url"]
        second, follower = await _stream_on(http, other, prompt, 1)
        assert meta_role(follower.frames) == "follower"
        first.close()
        second.close()
    assert len(pair.calls()) == 1
