"""Cluster mode together with routing, the Messages API and tenants: real
redis-server, gateway processes, and two simulators in this process (their
request logs are the upstreams' truth)."""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.cluster.directory import Directory
from gateway.keys import prompt_key
from gateway.sim.profile import SimProfile
from gateway.sim.server import SimServer
from tests.integration.cluster_fixture import (
    REDIS_SERVER,
    Member,
    RedisServer,
    running_member,
    running_redis,
)
from tests.integration.conftest import FAST_SIM
from tests.integration.sse_frames import FrameReader, openai_text
from tests.integration.test_cluster import _abort, _read_deltas, chat, expected

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@dataclass
class RoutedCluster:
    redis: RedisServer
    primary: SimServer
    backup: SimServer
    members: list[Member]


async def routed_cluster(
    stack: AsyncExitStack, tmp_path: Path, sim_factory, *, primary_fails: bool,
    backup_fails: bool = False, env: dict[str, str] | None = None, primary_extra: str = "",
    primary_profile: SimProfile | None = None,
) -> RoutedCluster:
    failing = dataclasses.replace(FAST_SIM, fail_status=503)
    primary = await sim_factory(primary_profile or (failing if primary_fails else FAST_SIM))
    backup = await sim_factory(failing if backup_fails else FAST_SIM)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[upstream]]\nname = "primary"\nurl = "{primary.url}"\nprotocol = "h2c"\n{primary_extra}\n'
        f'[[upstream]]\nname = "backup"\nurl = "{backup.url}"\nprotocol = "h2c"\n'
        f'priority = 1\n\n[routing]\nmax_attempts = 2\ncircuit_failures = 100\n'
    )
    redis = await stack.enter_async_context(running_redis(tmp_path / "redis"))
    settings = {"GATEWAY_CONFIG": str(config), "UPSTREAM_URL": "", "UPSTREAM_PROTOCOL": "",
                **(env or {})}
    members = list(await asyncio.gather(
        *(stack.enter_async_context(running_member("", redis.url, settings)) for _ in range(2))
    ))
    return RoutedCluster(redis, primary, backup, members)


async def open_stream(http: aiohttp.ClientSession, member: Member, prompt: str,
                      path: str = "/v1/chat/completions", **headers: str) -> aiohttp.ClientResponse:
    resp = await http.post(member.url + path, json=chat(prompt), headers=headers)
    assert resp.status == 200
    return resp


async def answers_on_both(
    http: aiohttp.ClientSession, cluster: RoutedCluster, prompt: str, called: SimServer
) -> list[str]:
    """A stream on the first member; once ``called`` has the owner's call, a
    streaming and a non-streaming request on the second: the three answers."""
    owner, other = cluster.members
    on_owner = await open_stream(http, owner, prompt)
    await called.log.wait_for_arrivals(1, timeout=10)
    on_other = await open_stream(http, other, prompt)
    whole = await http.post(other.url + "/v1/chat/completions", json=chat(prompt, stream=False))
    answers = [openai_text(await FrameReader(r).rest()) for r in (on_owner, on_other)]
    assert whole.status == 200
    answers.append((await whole.json())["choices"][0]["message"]["content"])
    return answers


async def test_a_follower_elsewhere_gets_the_answer_the_owner_fell_back_to(tmp_path, sim_factory):
    """The owner's first attempt gets a 503, the backup answers: a streaming
    and a non-streaming follower on the other process get that answer, with
    one call per attempt and none from their process."""
    prompt = "fallback for everyone [sim ttft_ms=1500]"
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(stack, tmp_path, sim_factory, primary_fails=True)
        owner, other = cluster.members
        async with aiohttp.ClientSession() as http:
            answers = await answers_on_both(http, cluster, prompt, cluster.backup)
        assert answers == [expected(prompt)] * 3
        assert [r.status for r in cluster.primary.log.records] == [503]
        assert len(cluster.backup.log.records) == 1
        assert await owner.metric("gateway_cluster_requests_total", 'role="owner"') == 1
        assert await other.metric("gateway_cluster_requests_total", 'role="owner"') == 0
        # A failure a fallback recovered is no failure: the key is released
        # (not written as the 503) and the next request elsewhere answers.
        entry = Directory.key(prompt_key(chat(prompt), tenant=None))
        async with asyncio.timeout(10):
            while await cluster.redis.keys(entry):  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            again = await open_stream(http, other, prompt)
            assert openai_text(await FrameReader(again).rest()) == expected(prompt)
        assert [r.status for r in cluster.primary.log.records] == [503, 503]
        assert len(cluster.backup.log.records) == 2


async def test_a_failure_after_every_attempt_is_shared_with_the_other_process(
    tmp_path, sim_factory
):
    """Both upstreams answer 503: the owner's two attempts are the only
    calls, and a request on the other process within the error TTL gets
    the failure without a call of its own."""
    prompt = "every upstream fails"
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(
            stack, tmp_path, sim_factory, primary_fails=True, backup_fails=True,
            env={"ERROR_TTL_MS": "60000"},
        )
        owner, other = cluster.members
        async with aiohttp.ClientSession() as http:
            async with http.post(owner.url + "/v1/chat/completions",
                                 json=chat(prompt, stream=False)) as resp:
                first = resp.status, await resp.json()
            entry = Directory.key(prompt_key(chat(prompt), tenant=None))
            async with asyncio.timeout(10):
                while not await cluster.redis.keys(entry):  # noqa: ASYNC110 - another process
                    await asyncio.sleep(0.05)
            async with http.post(other.url + "/v1/chat/completions",
                                 json=chat(prompt, stream=False)) as resp:
                second = resp.status, await resp.json()
        assert first[0] == 502 and first[1]["error"]["code"] == "upstream_503"
        assert second == first
        assert len(cluster.primary.log.records) == 1
        assert len(cluster.backup.log.records) == 1


async def test_the_messages_api_and_chat_completions_share_one_call_across_processes(
    tmp_path, sim_factory
):
    prompt = "two apis, two processes [sim ttft_ms=1500]"
    body = {"model": "sim", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(stack, tmp_path, sim_factory, primary_fails=False)
        first, second = cluster.members
        async with aiohttp.ClientSession() as http:
            via_chat = await http.post(first.url + "/v1/chat/completions", json=body)
            await cluster.primary.log.wait_for_arrivals(1, timeout=10)
            via_messages = await http.post(second.url + "/v1/messages", json=body)
            chat_text = openai_text(await FrameReader(via_chat).rest())
            frames = await FrameReader(via_messages).rest()
        messages_text = "".join(f.json()["delta"]["text"] for f in frames
                                if f.event == "content_block_delta")
        assert chat_text == messages_text == expected(prompt)
        assert len(cluster.primary.log.records) == 1
        assert await second.metric("gateway_cluster_requests_total", 'role="remote_follower"') == 1


async def test_two_tenants_on_two_processes_never_share(tmp_path, sim_factory):
    prompt = "one question, two tenants [sim ttft_ms=1500]"
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(
            stack, tmp_path, sim_factory, primary_fails=False,
            env={"GATEWAY_API_KEYS": "key-a,key-b"},
        )
        first, second = cluster.members
        async with aiohttp.ClientSession() as http:
            a1 = await open_stream(http, first, prompt, Authorization="Bearer key-a")
            await cluster.primary.log.wait_for_arrivals(1, timeout=10)
            b2 = await open_stream(http, second, prompt, Authorization="Bearer key-b")
            await cluster.primary.log.wait_for_arrivals(2, timeout=10)
            a2 = await open_stream(http, second, prompt, Authorization="Bearer key-a")
            texts = [openai_text(await FrameReader(r).rest()) for r in (a1, b2, a2)]
        assert texts == [expected(prompt)] * 3
        assert len(cluster.primary.log.records) == 2
        assert await second.metric("gateway_cluster_requests_total", 'role="owner"') == 1
        assert await second.metric("gateway_cluster_requests_total", 'role="remote_follower"') == 1


async def test_the_fallback_stream_is_reset_when_the_last_reader_anywhere_leaves(
    tmp_path, sim_factory
):
    """The owner fell back to the backup; its own client leaves and the
    follower on the other process reads on; when that one leaves too, the
    backup's stream is reset."""
    prompt = "fallback then cancel [sim itl_ms=20 tokens=500]"
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(stack, tmp_path, sim_factory, primary_fails=True)
        owner, other = cluster.members
        async with aiohttp.ClientSession() as http:
            on_owner = await http.post(owner.url + "/v1/stream", json=chat(prompt))
            owner_reader = FrameReader(on_owner)
            await _read_deltas(owner_reader, 1)
            on_other = await http.post(other.url + "/v1/stream", json=chat(prompt))
            other_reader = FrameReader(on_other)
            await _read_deltas(other_reader, 1)
            await _abort(on_owner)
            await _read_deltas(other_reader, 5)
            assert [r.ended for r in cluster.backup.log.records] == [False]
            aborted_at = await _abort(on_other)
            (reset,) = await cluster.backup.log.wait_for(1, outcome="reset", timeout=10)
        assert reset.end is not None and reset.end - aborted_at < 1.0
        assert [r.status for r in cluster.primary.log.records] == [503]
        assert len(cluster.backup.log.records) == 1


async def test_a_follower_that_joins_during_a_failing_attempt_gets_the_fallback(
    tmp_path, sim_factory
):
    """The follower on the other process joins while the owner's first
    attempt still waits (it times out on its first token): it gets the
    backup's answer, and the primary saw one call, the backup one."""
    prompt = "joined during the first attempt"
    async with AsyncExitStack() as stack:
        cluster = await routed_cluster(
            stack, tmp_path, sim_factory, primary_fails=False,
            primary_profile=dataclasses.replace(FAST_SIM, ttft_ms=5000),
            primary_extra="first_token_timeout_ms = 1000\n",
        )
        owner, other = cluster.members
        async with aiohttp.ClientSession() as http:
            answers = await answers_on_both(http, cluster, prompt, cluster.primary)
        assert answers == [expected(prompt)] * 3
        assert len(cluster.primary.log.records) == 1
        assert len(cluster.backup.log.records) == 1
        assert await other.metric("gateway_cluster_requests_total", 'role="owner"') == 0
        assert await other.metric("gateway_cluster_requests_total", 'role="remote_follower"') == 2
