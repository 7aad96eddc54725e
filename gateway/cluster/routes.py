"""The internal listener: other members read this process's logs here.

``POST /cluster/v1/requests/{request_id}/cancel`` is an explicit cancel that
another member received for a request of this process (``X-Cluster-Owner``:
the hash of the client's credential, as ``registry.cancel`` checks it).

``GET /cluster/v1/streams/{key}`` (``Last-Event-ID`` optional) joins the live
stream for the key as one more subscriber and relays it as the internal
format (``gateway.cluster.wire``); 404 when there is none here, 503 while
this process drains (the asker takes the key over). It never starts a
stream. With a cluster secret, a request must carry ``Authorization: Bearer
<secret>`` (compared in constant time) or gets 401.
Leaving -- the follower shutting the connection -- cancels the handler
(``handler_cancellation=True``), which closes the subscription: if it was the
last, the upstream stream is reset in that tick. A follower that closes
nothing because it hung or dropped off the network is noticed by its
silence: its relay sends an empty line in the request body every
``HEARTBEAT_S``, and a follower that sent nothing for ``SILENCE_S`` is dropped
(its subscription closed, its connection aborted) -- if it was the last
subscriber, the upstream stream is reset. A request without a body (a
member that sends none) is never dropped for silence.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from actors.messages import SlowReader
from actors.registry import Registry, RegistryClosed
from actors.subscription import Subscription
from gateway.api.relay import SharedFrames
from gateway.cluster.metrics import ClusterMetrics
from gateway.cluster.peer import (
    CANCEL_PATH,
    HEARTBEAT_S,
    METRICS_PATH,
    OWNER_HEADER,
    SILENCE_S,
    STREAM_PATH,
    OwnerLost,
)
from gateway.cluster.wire import END_LINE, encode_delta, error_line
from gateway.errors import GatewayError, ReaderTooSlow


@dataclass(slots=True)
class PeerStream:
    """One follower reading a stream here."""

    request: web.Request
    subscription: Subscription
    #: When it was last written to (monotonic).
    written: float
    #: When it last sent a byte of its request body; None: it sends none.
    heard: float | None


class Heartbeat:
    """Both directions of the peer streams' liveness, from one task: an
    empty line on every stream silent for ``interval_s`` (a relay tells a
    silent owner from a long first token), and the follower dropped once its
    request body has been silent for ``silence_s`` (a hung or cut-off
    follower would otherwise keep the upstream stream open to its end)."""

    def __init__(self, interval_s: float = HEARTBEAT_S, silence_s: float = SILENCE_S) -> None:
        self.interval_s = interval_s
        self.silence_s = silence_s
        #: Open peer streams.
        self.streams: dict[web.StreamResponse, PeerStream] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s / 2)
            now = time.monotonic()
            for response, peer in list(self.streams.items()):
                if response not in self.streams:
                    continue  # its stream ended while an earlier write waited
                if self._silent(peer, now):
                    self._drop(response, peer)
                elif peer.written <= now - self.interval_s:
                    await self._beat(response, peer)

    def _silent(self, peer: PeerStream, now: float) -> bool:
        """Whether the follower's request body has been silent too long
        (what it sent is read here, and dropped)."""
        if peer.heard is None:
            return False
        content = peer.request.content
        try:
            if content.read_nowait():
                peer.heard = now
        except Exception:
            return False  # the connection failed: its handler sees the same and ends
        if content.at_eof():
            peer.heard = None  # the relay has read the end: nothing more to hear
            return False
        return now - peer.heard >= self.silence_s

    def _drop(self, response: web.StreamResponse, peer: PeerStream) -> None:
        """Leave the stream for the silent follower (the upstream stream is
        reset here if it was the last subscriber), then cut its connection."""
        del self.streams[response]
        log.info("a cluster member went silent: its stream is dropped",
                 silent_s=round(self.silence_s, 1))
        peer.subscription.close()
        transport = peer.request.transport
        if transport is not None:
            transport.abort()

    async def _beat(self, response: web.StreamResponse, peer: PeerStream) -> None:
        peer.written = time.monotonic()
        try:
            # A member that stopped reading must not hold up the others'
            # heartbeats past their silence bound.
            async with asyncio.timeout(self.interval_s / 4):
                await response.write(b"\n")
        except (ConnectionResetError, RuntimeError, TimeoutError):
            pass  # its handler sees the same and ends


#: The longest the route waits for a stream this process is starting.
CLAIM_WAIT_S = 0.5

REGISTRY = web.AppKey("cluster_registry", Registry)
CLAIMING: web.AppKey[Callable[[str], asyncio.Event | None]] = web.AppKey("cluster_claiming")
#: Whether this process is draining (the gateway's own state).
DRAINING: web.AppKey[Callable[[], bool]] = web.AppKey("cluster_draining")
HEARTBEAT = web.AppKey("cluster_heartbeat", Heartbeat)
SECRET = web.AppKey("cluster_secret", str)
METRICS = web.AppKey("cluster_metrics", ClusterMetrics)
log = structlog.get_logger("gateway.cluster")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}},
        status=status,
    )


def _refused(request: web.Request) -> web.Response | None:
    """401 unless the request carries the cluster secret (when there is one)."""
    secret = request.app[SECRET]
    if secret:
        # The header's bytes as they came (aiohttp reads them with
        # surrogateescape): one that is not UTF-8 is a wrong secret, not a 500.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {secret}".encode()):
            return _error(401, "invalid_api_key", "the cluster secret does not match")
    return None


async def cancel(request: web.Request) -> web.Response:
    """An explicit cancel another member received for a request of ours."""
    if (refused := _refused(request)) is not None:
        return refused
    request_id = request.match_info["request_id"]
    if not request.app[REGISTRY].cancel(request_id, owner=request.headers.get(OWNER_HEADER)):
        return _error(404, "not_found", "no stream in flight with this request id here")
    return web.json_response({"id": request_id, "status": "cancelled"}, status=202)


async def follow(request: web.Request) -> web.StreamResponse:
    if (refused := _refused(request)) is not None:
        return refused
    raw = request.headers.get("Last-Event-ID", "")
    after = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else 0
    key = request.match_info["key"]
    registry = request.app[REGISTRY]
    claiming = request.app[CLAIMING](key)
    if claiming is not None and not registry.has(key):
        # Redis names this process, whose request has not yet started the
        # stream: wait for it (a moment) rather than send the asker off to
        # take the key over and make a second upstream call.
        try:
            async with asyncio.timeout(CLAIM_WAIT_S):
                await claiming.wait()
        except TimeoutError:
            pass
    if request.app[DRAINING]():
        # A new follower is a new request: a draining process takes none
        # (the asker takes the key over and leads it), where joining would
        # end its stream with ``shutting_down`` at this process's drain
        # timeout, on a member that is not shutting down.
        return _error(503, "shutting_down", "this gateway is shutting down")
    try:
        subscription = registry.join(
            # Unguessable: cancel-by-id must not reach another member's relay.
            key, request_id=f"peer-{secrets.token_hex(12)}", arrived_at=time.monotonic(),
            resume_after=after,
        )
    except RegistryClosed:
        return _error(503, "shutting_down", "this gateway is shutting down")
    if subscription is None:
        return _error(404, "not_found", "no live stream for this key here")
    request.app[METRICS].served_peer()
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    last = END_LINE
    heartbeat = request.app[HEARTBEAT].streams
    shared = SharedFrames(subscription, "cluster")
    async with subscription:
        await response.prepare(request)
        now = time.monotonic()
        heard = now if request.body_exists else None
        peer = heartbeat[response] = PeerStream(request, subscription, now, heard)
        try:
            while True:
                batch = subscription.take_batch()
                if batch is None:
                    await subscription.readable()
                    continue
                if not batch:
                    if subscription.outcome != "complete":
                        # Closed here before the end: never an end line
                        # after a partial answer.
                        last = error_line(OwnerLost("the owner's stream ended before its answer"))
                    break
                peer.written = time.monotonic()
                # Each line encoded once for every member that follows this stream.
                first = subscription.cursor - len(batch) + 1
                await response.write(b"".join(
                    [shared.frame(seq, delta, encode_delta) for seq, delta in enumerate(batch, first)]
                ))
        except GatewayError as exc:
            last = error_line(exc)
        except SlowReader as exc:
            # The member reads past this stream's lag bound: it is ended, as
            # a slow client would be; the other readers never waited for it.
            log.info("a cluster member read too slowly", reason=str(exc))
            last = error_line(ReaderTooSlow(str(exc)))
        except ConnectionResetError:
            pass  # the follower is gone, or was dropped for its silence: see below
        except Exception as exc:  # a bug, not a failure to share: said in-stream
            log.exception("relaying to a cluster member failed")
            internal = GatewayError("internal error", code="internal_error")
            internal.__cause__ = exc
            last = error_line(internal)
        finally:
            heartbeat.pop(response, None)
    transport = request.transport
    if transport is None or transport.is_closing():
        return response  # dropped for its silence, or gone: nobody to tell
    if not request.body_exists:
        # The last line and the end of the chunked body, in one write.
        await response.write_eof(last)
        return response
    await response.write(last)
    await _body_ended(request)
    await response.write_eof()
    return response


async def _body_ended(request: web.Request) -> None:
    """Until the follower's request body ends, which its relay does once it
    has read the last line, for at most ``HEARTBEAT_S``: ending the answer
    after the request lets the follower keep the connection for its next
    stream (a request still being sent would close it)."""
    try:
        async with asyncio.timeout(HEARTBEAT_S):
            while await request.content.readany():
                pass
    except Exception:  # late, cut or malformed: the answer ends all the same
        pass


def internal_app(
    registry: Registry,
    secret: str,
    metrics: ClusterMetrics,
    claiming: Callable[[str], asyncio.Event | None],
    process_metrics: CollectorRegistry,
    *,
    draining: Callable[[], bool],
) -> web.Application:
    app = web.Application()
    app[DRAINING] = draining
    app[CLAIMING] = claiming
    app[HEARTBEAT] = heartbeat = Heartbeat()

    async def beating(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(heartbeat.run(), name="cluster-heartbeat")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(beating)
    app[REGISTRY] = registry
    app[SECRET] = secret
    app[METRICS] = metrics
    app.router.add_get(STREAM_PATH + "{key}", follow)
    app.router.add_post(CANCEL_PATH, cancel)
    # This process's own metrics, at an address of its own: on the shared
    # port a scrape reaches whichever worker the kernel picks, and each
    # worker counts its own requests (docs/cluster.md, "Metrics").
    app.router.add_get(METRICS_PATH, make_aiohttp_handler(process_metrics))
    return app
