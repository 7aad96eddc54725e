"""One cluster member in this process (gateway/cluster/member.py) against a
real redis-server: its registry is real, its upstream a scripted one
(tests/unit/memory_source.py).

What the member does while Redis refuses connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from actors.registry import Registry
from gateway.admission import AdmissionQueue
from gateway.cluster.directory import PROBE_INTERVAL_S, Directory, Unavailable, connect
from gateway.cluster.member import Member
from gateway.cluster.metrics import ClusterMetrics
from gateway.cluster.peer import PeerClient
from tests.integration.cluster_fixture import REDIS_SERVER, running_redis
from tests.unit.memory_source import MemoryUpstream

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@dataclass
class Running:
    member: Member
    directory: Directory
    upstream: MemoryUpstream


@asynccontextmanager
async def member_in_process(
    redis_url: str, *, lease_ms: int = 10_000, error_ttl_ms: int = 2000
) -> AsyncIterator[Running]:
    """A member wired as gateway/cluster/membership.py wires it, with its
    writer and claim tasks running."""
    timeout_s = 0.25
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
