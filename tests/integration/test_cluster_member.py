"""One cluster member in this process (gateway/cluster/member.py) against a
real redis-server: its registry is real, its upstream a scripted one
(tests/unit/memory_source.py), and another member, where one is needed, an
aiohttp app answering the internal route.

What the member does while Redis refuses or stalls, what it writes once
Redis is back, and which keys it owns after a takeover.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from structlog.testing import capture_logs

from actors.registry import Registry
from actors.subscription import Subscription
from gateway.admission import AdmissionQueue
from gateway.cluster.directory import MEMBERS, PROBE_INTERVAL_S, Directory, Unavailable, connect
from gateway.cluster.member import MAX_ATTEMPTS, Member
from gateway.cluster.metrics import ClusterMetrics
from gateway.cluster.peer import STREAM_PATH, PeerClient
from gateway.cluster.wire import Owner, owner_entry
from gateway.config import MAX_DURATION_MS, ConfigError, Settings
from gateway.errors import UpstreamStatusError
from tests.integration.cluster_fixture import REDIS_SERVER, running_redis
from tests.loopback import serving
from tests.unit.memory_source import MemorySource, MemoryUpstream, read_all, text

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

KEY = "a-prompt-key"


@dataclass
class Running:
    member: Member
    directory: Directory
    upstream: MemoryUpstream

    async def opened(self) -> MemorySource:
        """The upstream call's source (one per test)."""
        await self.upstream.open_entered.wait()
        return self.upstream.latest

    async def lead(self) -> Subscription:
        return await self.member.subscribe(
            KEY, self.upstream.open, request_id="r1", arrived_at=time.monotonic(),
            streaming=True, coalesce=True, resume_after=0,
        )


@asynccontextmanager
async def member_in_process(
    redis_url: str, *, lease_ms: int = 10_000, error_ttl_ms: int = 2000, timeout_s: float = 0.25
) -> AsyncIterator[Running]:
    """A member wired as gateway/cluster/membership.py wires it, with its
    writer and claim tasks running."""
    metrics = ClusterMetrics(CollectorRegistry())
    directory = Directory(
        connect(redis_url, timeout_s), lease_ms=lease_ms, metrics=metrics, where="test",
        timeout_s=timeout_s,
    )
    member = Member(
        directory=directory, peers=PeerClient(secret=""), advertise_url="http://127.0.0.1:9",
        metrics=metrics, error_ttl_ms=error_ttl_ms, remember_failure=lambda exc: True,
    )
    registry = Registry(
        admission=AdmissionQueue(max_inflight=4, max_queue=0, queue_timeout_s=30),
        error_ttl_s=error_ttl_ms / 1000, observer=member.on_actor_event,
    )
    member.registry = registry
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(member.run(), name="cluster-member"),
        loop.create_task(directory.run_claims(), name="cluster-claims"),
    ]
    try:
        yield Running(member, directory, MemoryUpstream())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await registry.aclose()
        await member.aclose()


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def until_value_changes(client: Redis, name: str, value: bytes | None) -> bytes | None:
    """The entry's next value, once it is no longer ``value`` (a generous
    ceiling: the member's writes follow its probe, about a second)."""
    async with asyncio.timeout(10):
        while (current := await client.get(name)) == value:  # noqa: ASYNC110 - Redis's state
            await asyncio.sleep(0.02)
    return current  # type: ignore[no-any-return]


# -- what the settings hand to Redis ------------------------------------------------------


@pytest.mark.parametrize(("variable", "value"), [
    ("CLUSTER_LEASE_MS", str(MAX_DURATION_MS)),
    ("CLUSTER_LEASE_MS", str(2**63 - 1)),
    ("CLUSTER_REDIS_TIMEOUT_MS", str(MAX_DURATION_MS)),
    ("CLUSTER_REDIS_TIMEOUT_MS", str(10**400)),
], ids=["a day's lease", "a lease past what Redis takes", "a day's timeout",
        "a timeout past what a float holds"])
async def test_a_lease_or_redis_timeout_the_start_takes_is_one_every_claim_can_use(
    tmp_path: Path, variable: str, value: str
):
    """Redis refuses an expiry once now plus it overflows a signed 64-bit
    count of milliseconds, and a timeout is handed on in seconds, a float:
    such a value stops the start naming its variable, or else a claim owns
    the key."""
    async with running_redis(tmp_path / "redis") as server:
        try:
            settings = Settings.from_env({"REDIS_URL": server.url, variable: value})
        except ConfigError as exc:
            assert exc.variable == variable
            return
        async with member_in_process(
            server.url, lease_ms=settings.cluster_lease_ms,
            timeout_s=settings.cluster_redis_timeout_ms / 1000,
        ) as running, redis_client(server.url) as client:
            assert await running.directory.claim(KEY, b"mine") is None
            assert running.directory.up
            assert 0 < await client.pttl(Directory.key(KEY)) <= settings.cluster_lease_ms


# -- Redis refusing connections: probed once a second ------------------------------------


async def test_a_refusing_redis_is_probed_once_a_probe_interval(tmp_path: Path, monkeypatch):
    """A Redis that refuses connections fails a probe in microseconds: the
    writer must still wait a probe interval between two, not spin on them.
    A short lease puts the renewal due in the past while Redis is down."""
    async with running_redis(tmp_path / "redis") as redis:
        url = redis.url
    # Stopped: its port refuses connections now.
    probes = 0
    async with member_in_process(url, lease_ms=300) as running:
        directory = running.directory
        probe = directory.probe

        async def counted_probe() -> None:
            nonlocal probes
            probes += 1
            await probe()

        monkeypatch.setattr(directory, "probe", counted_probe)
        with pytest.raises(Unavailable):
            await directory.members()
        assert not directory.up
        window_s = 2.0
        cpu_s = time.process_time()
        await asyncio.sleep(window_s)  # the period the probes are counted over
        cpu_s = time.process_time() - cpu_s
    print(f"{probes} probes of a refusing Redis in {window_s:g} s, {cpu_s * 1000:.0f} ms of CPU")
    assert 1 <= probes <= window_s / PROBE_INTERVAL_S + 1
    assert not directory.up


async def test_redis_back_is_noticed_within_a_probe_interval_with_the_default_lease(
    tmp_path: Path, monkeypatch
):
    """With the default lease the renewal is seconds away while Redis is
    down: the probes must still come a probe interval apart, not two. Redis
    answering again right after a failed probe (the worst case) is noticed
    at the next probe, and a refusing Redis is probed once an interval."""
    async with running_redis(tmp_path / "redis") as redis, member_in_process(redis.url) as running:
        directory = running.directory
        probe = directory.probe
        probes = 0
        failed = asyncio.Event()
        back = asyncio.Event()

        async def observed_probe() -> None:
            nonlocal probes
            probes += 1
            await probe()
            (back if directory.up else failed).set()

        monkeypatch.setattr(directory, "probe", observed_probe)

        async def down() -> None:
            await redis.stop()  # its port refuses connections now
            with pytest.raises(Unavailable):
                await directory.members()
            failed.clear()
            async with asyncio.timeout(5):
                await failed.wait()

        await down()
        failed_at = time.monotonic()
        await redis.start()
        async with asyncio.timeout(10):  # a generous ceiling; measured below
            await back.wait()
        noticed_s = time.monotonic() - failed_at

        await down()
        counted_from = probes
        window_s = 3.5  # probes due 1, 2 and 3 s into it, none at its edges
        await asyncio.sleep(window_s)  # the period the probes are counted over
        count = probes - counted_from
    print(f"Redis back noticed {noticed_s:.2f} s after a failed probe; "
          f"{count} probes of a refusing Redis in {window_s:g} s")
    assert noticed_s < 1.8 * PROBE_INTERVAL_S
    per_window = window_s / PROBE_INTERVAL_S
    assert per_window - 1 <= count <= per_window + 1


async def test_a_redis_that_answers_but_refuses_claims_stays_down_and_is_said_once(
    tmp_path: Path, monkeypatch
):
    """A Redis that answers PING but refuses every write (here one short of
    min-replicas-to-write; a replica after a failover, a full memory or a
    server older than 7.0 alike) takes no claim: the member stays down, said
    once, while requests keep coming, and is back once claims work."""
    up_after_each_probe: list[bool] = []
    async with running_redis(tmp_path / "redis") as redis, redis_client(redis.url) as client:
        await client.config_set("min-replicas-to-write", 1)
        with capture_logs() as logs:
            async with member_in_process(redis.url) as running:
                directory = running.directory
                probe = directory.probe
                probed = asyncio.Event()

                async def observed_probe() -> None:
                    await probe()
                    probed.set()

                monkeypatch.setattr(directory, "probe", observed_probe)
                for n in range(3):
                    probed.clear()
                    subscription = await running.member.subscribe(
                        f"{KEY}-{n}", running.upstream.open, request_id=f"r{n}",
                        arrived_at=time.monotonic(), streaming=True, coalesce=True,
                        resume_after=0,
                    )
                    subscription.close()
                    async with asyncio.timeout(5):  # a generous ceiling: one a second
                        await probed.wait()
                    up_after_each_probe.append(directory.up)
                await client.config_set("min-replicas-to-write", 0)
                async with asyncio.timeout(5):
                    while not directory.up:
                        probed.clear()
                        await probed.wait()
                claimed = await directory.claim(KEY, b"mine")
    assert up_after_each_probe == [False, False, False]
    assert claimed is None
    said = [log["event"] for log in logs if log["event"].startswith("cluster directory")]
    assert said == [
        "cluster directory unavailable: coalescing locally until it is back",
        "cluster directory back: coalescing across the cluster",
    ]


# -- Redis back empty: the leases and the member entry at once -------------------------


async def test_a_lease_and_the_member_entry_are_written_right_after_redis_is_back_empty(
    tmp_path: Path,
):
    """Redis restarts with nothing in it while this member leads a stream:
    the probe that finds it back is followed at once (not at the next
    renewal, a third of the 10 s lease away) by the stream's lease and the
    member entry, so other members follow the stream and reach it by id."""
    async with (
        running_redis(tmp_path / "redis") as redis,
        member_in_process(redis.url) as running,
        redis_client(redis.url) as client,
    ):
        name = Directory.key(KEY)
        mine = owner_entry(running.member.me)
        subscription = await running.lead()
        assert await client.get(name) == mine
        # Its first renewal lists it: the next is a third of the lease away.
        async with asyncio.timeout(5):
            while not await client.zscore(MEMBERS, running.member.me.url):  # noqa: ASYNC110 - Redis's state
                await asyncio.sleep(0.02)
        await redis.stop()
        with pytest.raises(Unavailable):
            await running.directory.members()  # the member knows Redis is down
        await redis.start()
        back_at = time.monotonic()
        async with asyncio.timeout(10):  # a generous ceiling; measured below
            while await client.get(name) is None or not await client.zscore(  # noqa: ASYNC110 - Redis's state
                MEMBERS, running.member.me.url
            ):
                await asyncio.sleep(0.02)
        back_s = time.monotonic() - back_at
        assert await client.get(name) == mine
        assert 0 < await client.pttl(name) <= 10_000
        subscription.close()
    print(f"lease and member entry back {back_s:.2f} s after Redis")
    assert back_s < 1.8 * PROBE_INTERVAL_S


# -- the claims loop stopping (the gateway's shutdown) -----------------------------------


async def test_a_claim_on_its_way_when_the_claims_loop_stops_is_answered(tmp_path: Path):
    """The claims loop is cancelled (the gateway stops) while a claim waits
    on a stalled Redis: the claim fails as the directory being unavailable
    at once (its request is served locally, or refused by a closing
    registry), never waits for an answer nobody will give; so does a claim
    made once the loop has stopped."""
    async with running_redis(tmp_path / "redis") as redis:
        directory = Directory(
            connect(redis.url, 30.0), lease_ms=10_000, metrics=ClusterMetrics(CollectorRegistry()),
            where="test", timeout_s=30.0,
        )
        claims = asyncio.create_task(directory.run_claims())
        try:
            redis.pause()
            claim = asyncio.create_task(directory.claim(KEY, b"mine"))
            while not directory._claims:  # noqa: ASYNC110 - until the claim is queued,
                await asyncio.sleep(0)
            while directory._claims:  # noqa: ASYNC110 - then sent in a pipeline
                await asyncio.sleep(0)
            claims.cancel()
            with pytest.raises(asyncio.CancelledError):
                await claims
            async with asyncio.timeout(5):  # a generous ceiling on "at once"
                with pytest.raises(Unavailable):
                    await claim
                with pytest.raises(Unavailable):
                    await directory.claim(KEY, b"mine")  # and one made after the loop
        finally:
            redis.resume()
            claims.cancel()
            await directory.aclose()


# -- a cancel that arrives while Redis is being asked ----------------------------------


async def test_a_task_cancelled_while_it_asks_redis_ends(tmp_path: Path):
    """A task that keeps asking Redis (the member's writer, the claims loop)
    ends when cancelled, wherever in a call the cancel lands: redis-py
    returns from a pipeline now and then with the cancel lost (a few in a
    hundred here), and the task would then go on asking, for ever."""
    metrics = ClusterMetrics(CollectorRegistry())
    rng = random.Random(7)
    async with running_redis(tmp_path / "redis") as redis:
        directory = Directory(connect(redis.url), lease_ms=10_000, metrics=metrics, where="test")

        async def keep_asking() -> None:
            while True:
                await directory.write([("renew", KEY, b"mine", None)])

        still_asking: list[asyncio.Task[None]] = []
        try:
            for _ in range(300):
                task = asyncio.create_task(keep_asking())
                await asyncio.sleep(rng.random() / 500)
                task.cancel()
                await asyncio.wait([task], timeout=5)  # a generous ceiling on "ends"
                if not task.done():
                    still_asking.append(task)
                    break
                assert task.cancelled()
        finally:
            for task in still_asking:
                task.cancel()  # once more: it ends at a cancel redis-py keeps
            if still_asking:
                await asyncio.wait(still_asking, timeout=5)
            await directory.aclose()
        assert still_asking == []


# -- the member list, written and read by hosts whose clocks disagree -------------------


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0], ids=["an hour ahead", "an hour behind"])
async def test_the_member_list_holds_every_member_whatever_a_hosts_clock_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skew_s: float
):
    """Two members list themselves, one on a host whose wall clock is an
    hour off: each reads both entries, and neither write removes the other's
    (an entry expires by Redis's clock, the one both share). The scripts
    that time it are loaded again on a Redis that lost them."""
    metrics = ClusterMetrics(CollectorRegistry())
    host_time = time.time

    @contextmanager
    def on_the_skewed_host() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda: host_time() + skew_s)
            yield

    async with running_redis(tmp_path / "redis") as redis:
        skewed = Directory(connect(redis.url), lease_ms=10_000, metrics=metrics, where="test")
        exact = Directory(connect(redis.url), lease_ms=10_000, metrics=metrics, where="test")
        try:
            with on_the_skewed_host():
                await skewed.write([("member", "http://skewed:1", b"", None)])
            await exact.write([("member", "http://exact:1", b"", None)])
            with on_the_skewed_host():
                await skewed.write([("member", "http://skewed:1", b"", None)])
            async with redis_client(redis.url) as client:
                await client.script_flush()  # as a restarted Redis: the scripts load again
            with on_the_skewed_host():
                from_skewed = sorted(await skewed.members())
            from_exact = sorted(await exact.members())
        finally:
            await skewed.aclose()
            await exact.aclose()
    assert [from_skewed, from_exact] == [["http://exact:1", "http://skewed:1"]] * 2


# -- a failure recorded once Redis is back: the error TTL left, or nothing ------------------


@pytest.mark.parametrize(("error_ttl_ms", "outage_s"), [(4000, 1.0), (1000, 1.2)])
async def test_a_failure_written_after_an_outage_keeps_only_the_error_ttl_left(
    tmp_path: Path, error_ttl_ms: int, outage_s: float
):
    """The stream fails while Redis stalls (a partition: nothing refused,
    nothing answered; the entry outlives it). The failure answers for the
    error TTL from the failure, not from Redis's return: what is left of it,
    or, once it is over, nothing (the key is released)."""
    async with (
        running_redis(tmp_path / "redis") as redis,
        member_in_process(redis.url, error_ttl_ms=error_ttl_ms) as running,
        redis_client(redis.url) as client,
    ):
        name = Directory.key(KEY)
        subscription = await running.lead()
        assert subscription.role == "leader"
        mine = owner_entry(running.member.me)
        assert await client.get(name) == mine
        source = await running.opened()
        redis.pause()
        with pytest.raises(Unavailable):
            await running.directory.members()  # the member knows Redis is down
        source.fail(UpstreamStatusError(500, "boom"))
        async with subscription:
            with pytest.raises(UpstreamStatusError):
                await read_all(subscription)
        await asyncio.sleep(outage_s)  # the outage
        redis.resume()
        value = await until_value_changes(client, name, mine)
        pttl_ms = await client.pttl(name)
    print(f"a {error_ttl_ms} ms error TTL after a {outage_s:g} s outage: {value!r:.20}, PTTL {pttl_ms} ms")
    left_ms = error_ttl_ms - outage_s * 1000
    if left_ms > 0:
        # Redis, probed once a second, took the write well within the TTL.
        assert value is not None and value.startswith(b"e ")
        assert 0 < pttl_ms <= left_ms
    else:
        assert value is None


# -- a takeover that succeeds on the last attempt -----------------------------------------


async def test_a_key_taken_over_on_the_last_attempt_is_owned(tmp_path: Path):
    """Every owner Redis names has lost the stream, and by the time the
    member takes its key over another one has claimed it, until the last
    attempt's takeover wins: the member owns the key (renews it, and
    releases it at the stream's end) as after any takeover."""
    async with (
        running_redis(tmp_path / "redis") as redis,
        member_in_process(redis.url) as running,
        redis_client(redis.url) as client,
    ):
        name = Directory.key(KEY)
        gone: list[bytes] = []

        async def follow(request: web.Request) -> web.Response:
            # This owner no longer has the stream, and (but for the last)
            # another one claims the key before the asker takes it over.
            named = gone.index(await client.get(name))
            if named + 1 < len(gone):
                await client.set(name, gone[named + 1], px=10_000)
            return web.Response(status=404)

        app = web.Application()
        app.router.add_get(STREAM_PATH + "{key}", follow)
        async with serving(app) as url:
            gone.extend(owner_entry(Owner(f"gone{n}", url)) for n in range(MAX_ATTEMPTS))
            await client.set(name, gone[0], px=10_000)
            subscription = await running.lead()
        assert subscription.role == "leader"
        assert await client.get(name) == owner_entry(running.member.me)
        assert running.member.owned == {KEY: subscription.stream_id}
        source = await running.opened()
        source.push(*text("a", "b"))
        source.finish()
        async with subscription:
            assert [d.text for d in await read_all(subscription)] == ["a", "b"]
        assert await until_value_changes(client, name, owner_entry(running.member.me)) is None
    assert running.member.counts.takeovers == 1
