"""This process as a cluster member.

Per request (``subscribe``), in order, stopping at the first that answers:

1. a live stream (or a remembered failure) for the key in this process: join
   it, no Redis at all;
2. one Redis round trip, ``SET key <me> NX PX lease GET``:
   - it was free (or already named this process): lead here, as a single
     process would, and own the key;
   - it names another owner: read that owner's log through a relay actor
     here (identical requests on this process then join the relay); if the
     owner refuses or no longer has the stream, take the key over
     (compare-and-set) and lead here at once;
   - it holds a failure (error TTL): answer with it;
3. the directory is down or slow: lead here, local-only (fail open).

As an owner this process renews its leases while the streams run (one
pipeline every third of the lease) and, at a stream's end, deletes its entry
or replaces it with the failure for the error TTL -- all through one bounded
queue drained by one task, off the requests' path. A stream that goes past
its replay budget releases its key at once (the next request anywhere leads
anew), but this process still answers for its failure: if it fails, the
failure is written for the error TTL unless another owner holds the key by
then. A renewal sets a missing
key again, and covers every shared stream this process leads that still
takes joiners, also one started while Redis was down: once Redis is back (or
has lost its data), the other members find those streams instead of calling
the upstream again. Right after a probe finds Redis back, the leases and this
process's member entry are written at once, not at the next renewal.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from actors.messages import ActorEvent, Failed, JoinersClosed, StreamEnd, StreamEnded
from actors.ports import OpenSource, Source
from actors.registry import Registry
from actors.subscription import Subscription
from gateway.cluster.directory import PROBE_INTERVAL_S, Directory, Unavailable
from gateway.cluster.metrics import ClusterMetrics
from gateway.cluster.peer import PeerClient, PeerSource, PeerUnreachable
from gateway.cluster.wire import (
    FailureEntry,
    Owner,
    RemoteFailure,
    WireError,
    decode_entry,
    encode_failure,
    owner_entry,
)
from gateway.errors import GatewayError

log = structlog.get_logger("gateway.cluster")

#: Directory writes waiting for the writer task; past this, the oldest
#: intent is dropped (its lease simply expires).
MAX_PENDING_WRITES = 10_000
#: A key whose owner keeps changing under us is served locally after this
#: many attempts.
MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class _Write:
    op: str  # "release" | "fail"
    key: str
    #: A failure's directory value, and when the stream failed (monotonic).
    failure: bytes = b""
    failed_at: float = 0.0


@dataclass(slots=True)
class ClusterCounts:
    owner: int = 0
    local_follower: int = 0
    remote_follower: int = 0
    takeovers: int = 0


class Member:
    def __init__(
        self,
        *,
        directory: Directory,
        peers: PeerClient,
        advertise_url: str,
        metrics: ClusterMetrics,
        error_ttl_ms: int,
        remember_failure: Callable[[BaseException], bool],
    ) -> None:
        self.directory = directory
        self._peers = peers
        self.me = Owner(secrets.token_hex(6), advertise_url)
        self._mine = owner_entry(self.me)
        self.metrics = metrics
        self._error_ttl_ms = error_ttl_ms
        self._remember_failure = remember_failure
        self.registry: Registry | None = None
        #: Keys of the shared streams this process leads, while they take
        #: joiners -> that stream: named by this process in the directory,
        #: or to be at the next renewal (a stream started while Redis was
        #: down; an entry Redis lost).
        self.owned: dict[str, int] = {}
        #: Streams this process leads that took no joiners any more (past the
        #: replay budget; their keys released) -> their key: a failure of
        #: theirs is still shared through the directory. Left at their end.
        self._past_budget: dict[int, str] = {}
        #: Relay actors' sources, by stream id: reset when the stream ends,
        #: also if its task stopped before it took the source.
        self._relays: dict[int, Source] = {}
        self._writes: asyncio.Queue[_Write] = asyncio.Queue(MAX_PENDING_WRITES)
        self._wake = asyncio.Event()
        #: Keys a request of this process is claiming right now.
        self._claiming: dict[str, asyncio.Event] = {}
        #: Whether this process's entries (member list, leases) have been
        #: written since it was bound or Redis was last found back.
        self._listed = False
        self.counts = ClusterCounts()

    def advertise(self, url: str) -> None:
        """The address other members reach this process at (set once bound)."""
        self.me = Owner(self.me.instance, url)
        self._mine = owner_entry(self.me)
        self._listed = False
        self._wake.set()  # on the member list now, not at the next renewal

    # -- a request ---------------------------------------------------------------

    async def subscribe(
        self,
        key: str,
        open_source: OpenSource,
        *,
        request_id: str,
        arrived_at: float,
        streaming: bool,
        coalesce: bool,
        resume_after: int,
    ) -> Subscription:
        registry = self.registry
        assert registry is not None, "bind the registry first"

        def local(relay: Callable[[], asyncio.Future[Source]] | None = None) -> Subscription:
            return registry.subscribe(
                key, open_source, request_id=request_id, arrived_at=arrived_at,
                streaming=streaming, coalesce=coalesce, resume_after=resume_after, relay=relay,
            )

        shared = coalesce and registry.would_share(streaming)
        if not shared or registry.has(key) or not self.directory.up:
            # Led here while Redis is down: owned all the same, so that it
            # is registered once Redis is back.
            return self._counted(local(), shared=shared)
        waiting = self._claiming.get(key)
        if waiting is not None:
            # Another request here is deciding for this key: its decision
            # (bounded by the Redis and peer timeouts) serves this one too,
            # without a second round trip.
            await waiting.wait()
            if registry.has(key):
                return self._counted(local(), shared=True)
        # Between Redis naming this process and the stream existing here, a
        # member that read the entry may already ask for the stream: the
        # internal route waits on this instead of answering 404.
        claiming = self._claiming.get(key)
        if claiming is None:
            claiming = self._claiming[key] = asyncio.Event()
        try:
            return await self._decide(key, registry, local)
        finally:
            if self._claiming.get(key) is claiming:
                del self._claiming[key]
            claiming.set()

    def claiming(self, key: str) -> asyncio.Event | None:
        """Set once a request of this process that is claiming ``key`` has
        decided (the stream exists here, or will not); None: nobody is."""
        return self._claiming.get(key)

    async def _decide(
        self, key: str, registry: Registry, local: Callable[..., Subscription]
    ) -> Subscription:
        try:
            current = await self.directory.claim(key, self._mine)
            for _ in range(MAX_ATTEMPTS):
                if current is None or current == self._mine:
                    return self._counted(local(), shared=True)
                if registry.has(key):  # a local stream started while we asked
                    return self._counted(local(), shared=True)
                try:
                    entry = decode_entry(current)
                except WireError:
                    current = await self.directory.take_over(key, current, self._mine)
                    continue
                if isinstance(entry, FailureEntry):
                    return self._counted(local(_failing(entry.error)), shared=True)
                if entry.instance == self.me.instance:
                    return self._counted(local(), shared=True)
                if entry.url == self.me.url:
                    # A lease left by this address's previous process (it
                    # crashed and restarted): nothing there to follow.
                    current = await self.directory.take_over(key, current, self._mine)
                    continue
                try:
                    peer = await self._peers.follow(entry.url, key)
                except PeerUnreachable:
                    peer = None
                if peer is not None:
                    if registry.has(key):
                        peer.reset()
                        return self._counted(local(), shared=True)
                    try:
                        subscription = local(_opened(peer))
                    except BaseException:
                        peer.reset()  # refused (a closing registry): leave the owner now
                        raise
                    self._relays[subscription.stream_id] = peer
                    return self._counted(subscription, shared=True)
                # Refused, or the owner no longer has it: take it over now,
                # not at the lease's expiry.
                current = await self.directory.take_over(key, current, self._mine)
                if current is None:
                    self.counts.takeovers += 1
                    self.metrics.takeovers.inc()
                    log.info("took over a key from an owner that did not answer", owner=entry.url)
            # The last attempt's takeover may have won the key: owned as
            # after any other (renewed, then released or failed).
            if current is None or current == self._mine:
                return self._counted(local(), shared=True)
        except Unavailable:
            pass
        return self._counted(local(), shared=True)

    async def cancel_elsewhere(self, request_id: str, owner: str | None) -> bool:
        """Pass on an explicit cancel this process has no stream for: to every
        other member at once (the request is in at most one). Only on that
        miss: no request pays for the member list."""
        try:
            members = await self.directory.members()
        except Unavailable:
            return False
        others = [url for url in members if url != self.me.url]
        if not others:
            return False
        answers = await asyncio.gather(
            *(self._peers.cancel(url, request_id, owner) for url in others)
        )
        return any(answers)

    def _counted(self, subscription: Subscription, *, shared: bool) -> Subscription:
        """Count the request by its role; a shared stream it leads is owned
        (whatever the claim said: the renewal never takes another's key)."""
        registry = self.registry
        assert registry is not None
        if subscription.role == "leader":
            role = "owner"
            self.counts.owner += 1
            if shared:
                self.owned[subscription.key] = subscription.stream_id
        elif registry.relayed(subscription.stream_id) or subscription.stream_id in self._relays:
            role = "remote_follower"
            self.counts.remote_follower += 1
        else:
            role = "local_follower"
            self.counts.local_follower += 1
        self.metrics.requests[role].inc()
        return subscription

    # -- what the registry tells us (synchronous) ---------------------------------------

    def on_actor_event(self, event: ActorEvent) -> None:
        match event:
            case StreamEnded(stream_id=stream_id, key=key, end=end):
                relay = self._relays.pop(stream_id, None)
                if relay is not None:
                    relay.reset()
                if self.owned.get(key) == stream_id:
                    del self.owned[key]
                    failure = self._shared_failure(key, end)
                    self._queue(_Write("release", key) if failure is None else failure)
                elif self._past_budget.pop(stream_id, None) is not None:
                    # Its key is released already: only a failure to share.
                    failure = self._shared_failure(key, end)
                    if failure is not None:
                        self._queue(failure)
            case JoinersClosed(stream_id=stream_id, key=key):
                # No new joiners here: nor elsewhere; the next one leads anew.
                if self.owned.get(key) == stream_id:
                    del self.owned[key]
                    self._past_budget[stream_id] = key
                    self._queue(_Write("release", key))
            case _:
                pass

    def _shared_failure(self, key: str, end: StreamEnd) -> _Write | None:
        """The directory write that shares a stream's failure for the error
        TTL, or None when it ended otherwise (or is not to be remembered)."""
        if not isinstance(end, Failed) or self._error_ttl_ms <= 0:
            return None
        if not self._remember_failure(end.error):
            return None
        error = end.error
        if not isinstance(error, GatewayError):
            error = GatewayError("internal error", code="internal_error")
        return _Write("fail", key, encode_failure(error), time.monotonic())

    def _queue(self, write: _Write) -> None:
        if self._writes.full():
            self._writes.get_nowait()  # the oldest: its lease expires instead
        self._writes.put_nowait(write)
        self._wake.set()

    # -- the writer task -----------------------------------------------------------------

    async def run(self) -> None:
        """Directory writes, lease renewal, and the probe while Redis is down."""
        renew_every = self.directory.lease_ms / 3000
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + renew_every
        next_probe = loop.time()
        while True:
            if self.directory.up:
                # At most a probe interval, so an outage a request ran into is
                # probed (and over) within seconds.
                timeout = min(PROBE_INTERVAL_S, next_renewal - loop.time())
                try:
                    async with asyncio.timeout(max(0.0, timeout)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if not self.directory.up:
                # Nothing can be written before Redis is back: no wait on what
                # is queued or due, only a probe every probe interval, counted
                # from the last one's start (a refused connection fails at
                # once, a stalled one takes its timeout).
                await asyncio.sleep(max(0.0, next_probe - loop.time()))
                next_probe = loop.time() + PROBE_INTERVAL_S
                await self.directory.probe()
                if not self.directory.up:
                    continue
                # Back: Redis may have lost its data (a restart), and streams
                # may have started here meanwhile: leases and the member
                # entry now, not at the next renewal.
                self._listed = False
            self._wake.clear()
            ops = self._pending_writes()
            if loop.time() >= next_renewal or not self._listed:
                next_renewal = loop.time() + renew_every
                ops.extend(("renew", key, self._mine, None) for key in self.owned)
                if self.me.url:  # once the internal listener is bound
                    ops.append(("member", self.me.url, self._mine, None))
                    self._listed = True
            try:
                await self.directory.write(ops)
            except Unavailable:
                pass  # written again once Redis is back; failures were shared in-stream

    def _pending_writes(self) -> list[tuple[str, str, bytes, object]]:
        """The queued writes, minus those about a key that a newer stream of
        this process owns again (its entry, the same value, must stay).

        A failure answers for the error TTL from the failure, not from its
        write (which an outage delays): it is written with the TTL left, or,
        once none is, the key is released as if the entry had expired.
        """
        ops: list[tuple[str, str, bytes, object]] = []
        now = time.monotonic()
        while not self._writes.empty():
            write = self._writes.get_nowait()
            if write.key in self.owned:
                continue
            if write.op == "fail":
                left_ms = int(self._error_ttl_ms - (now - write.failed_at) * 1000)
                if left_ms > 0:
                    ops.append(("fail", write.key, self._mine, (write.failure, left_ms)))
                    continue
            ops.append(("release", write.key, self._mine, None))
        return ops

    async def flush(self, timeout_s: float) -> None:
        """The writes still queued, once, within ``timeout_s`` (at shutdown)."""
        ops = self._pending_writes()
        ops.extend(("release", key, self._mine, None) for key in self.owned)
        ops.append(("leave", self.me.url, self._mine, None))
        self.owned.clear()
        self._past_budget.clear()
        if ops and self.directory.up:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.directory.write(ops)
            except (Unavailable, TimeoutError):
                pass

    async def aclose(self) -> None:
        for relay in self._relays.values():
            relay.reset()
        self._relays.clear()
        await self._peers.aclose()
        await self.directory.aclose()


def _opened(source: PeerSource) -> Callable[[], asyncio.Future[Source]]:
    """The relay opener of a stream already open."""

    def open_relay() -> asyncio.Future[Source]:
        future: asyncio.Future[Source] = asyncio.get_running_loop().create_future()
        future.set_result(source)
        return future

    return open_relay


def _failing(error: RemoteFailure) -> Callable[[], asyncio.Future[Source]]:
    """The relay opener of a failure recorded by another process."""

    def open_relay() -> asyncio.Future[Source]:
        future: asyncio.Future[Source] = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        return future

    return open_relay
