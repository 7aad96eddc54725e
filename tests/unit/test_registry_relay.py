"""Registry: relaying another process's log, joining without leading, the
observer (the registry's side of cluster mode)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.deltas import Delta
from actors.messages import ActorEvent, StreamEnded, UpstreamOpening
from actors.registry import Registry
from gateway.admission import AdmissionQueue
from gateway.errors import UpstreamStatusError
from tests.unit.memory_source import MemoryUpstream, read_all, text


@pytest.fixture
async def events() -> list[ActorEvent]:
    return []


@pytest.fixture
async def registry(events: list[ActorEvent]) -> AsyncIterator[Registry]:
    admission = AdmissionQueue(max_inflight=1, max_queue=0, queue_timeout_s=30)
    registry = Registry(admission=admission, error_ttl_s=5.0, observer=events.append)
    yield registry
    await registry.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_relay_takes_no_admission_slot_and_local_requests_join_it(registry, events):
    """The one upstream slot is free after a relay started: a relay makes no
    upstream call. Identical requests join the relay; a resumed one starts
    after its Last-Event-ID (the relayed log keeps the owner's numbering)."""
    owner = MemoryUpstream()  # stands for the other process's log
    upstream = MemoryUpstream()
    first = registry.subscribe("k", upstream.open, request_id="a", arrived_at=0.0,
                               relay=owner.open)
    second = registry.subscribe("k", upstream.open, request_id="b", arrived_at=0.0)
    resumed = registry.subscribe("k", upstream.open, request_id="c", arrived_at=0.0,
                                 resume_after=2)
    assert (first.role, second.role, resumed.role) == ("follower", "follower", "follower")
    assert first.stream_id == second.stream_id == resumed.stream_id
    assert registry.relayed(first.stream_id) and registry.has("k")
    source = await owner.next_source()
    source.push(*text("a", "b", "c"))
    source.finish()
    assert [d.text for d in await read_all(first)] == ["a", "b", "c"]
    assert [d.text for d in await read_all(second)] == ["a", "b", "c"]
    assert [d.text for d in await read_all(resumed)] == ["c"]
    # The slot was never taken: a new stream for another key is admitted.
    other = registry.subscribe("other", upstream.open, request_id="d", arrived_at=0.0)
    assert other.role == "leader"
    (await upstream.next_source()).finish()
    await read_all(other)
    stats = registry.statistics()
    assert stats.upstream_calls_total == 1 and stats.followers_total == 3
    assert [type(e) for e in events if isinstance(e, UpstreamOpening | StreamEnded)] == [
        UpstreamOpening, StreamEnded, UpstreamOpening, StreamEnded,
    ]


async def test_a_relayed_failure_is_not_remembered_here(registry):
    owner = MemoryUpstream()
    upstream = MemoryUpstream()
    failing = registry.subscribe("k", upstream.open, request_id="a", arrived_at=0.0,
                                 relay=owner.open)
    (await owner.next_source()).fail(UpstreamStatusError(500, "boom"))
    with pytest.raises(UpstreamStatusError):
        await read_all(failing)
    failing.close()
    assert not registry.has("k")


async def test_the_last_local_subscriber_leaving_resets_the_relay_in_that_tick(registry):
    owner = MemoryUpstream()
    upstream = MemoryUpstream()
    a = registry.subscribe("k", upstream.open, request_id="a", arrived_at=0.0, relay=owner.open)
    b = registry.subscribe("k", upstream.open, request_id="b", arrived_at=0.0)
    source = await owner.next_source()
    source.push(Delta(text="x"))
    a.close()
    assert source.reset_calls == 0
    b.close()
    assert source.reset_calls == 1
    # Not an upstream reset: the owner counts that one.
    assert registry.statistics().resets_total == 0


async def test_join_attaches_to_a_live_stream_or_a_remembered_failure_and_never_leads(registry):
    upstream = MemoryUpstream()
    assert registry.join("k", request_id="peer-1", arrived_at=0.0) is None
    lead = registry.subscribe("k", upstream.open, request_id="a", arrived_at=0.0)
    source = await upstream.next_source()
    source.push(*text("a", "b"))
    peer = registry.join("k", request_id="peer-2", arrived_at=0.0, resume_after=1)
    assert peer is not None and peer.stream_id == lead.stream_id
    source.fail(UpstreamStatusError(503, "down"))
    with pytest.raises(UpstreamStatusError):
        await read_all(peer)
    with pytest.raises(UpstreamStatusError):
        await read_all(lead)
    remembered = registry.join("k", request_id="peer-3", arrived_at=0.0)
    assert remembered is not None
    with pytest.raises(UpstreamStatusError):
        await read_all(remembered)
    # Peers count as neither leaders nor followers; one upstream call.
    stats = registry.statistics()
    assert (stats.leaders_total, stats.followers_total, stats.upstream_calls_total) == (1, 0, 1)
