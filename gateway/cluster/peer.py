"""The client side of the internal hop: read another member's log.

``PeerClient.follow()`` sends one GET to the owner's internal listener over
pooled keep-alive connections (aiohttp) and returns once the owner has
answered the head: a ``PeerSource`` when the owner has the stream and took
this process as one more subscriber; None when it no longer has it (404);
``PeerUnreachable`` when its address refuses or does not answer within
``CONNECT_TIMEOUT_S`` (a dead owner: the caller takes the key over).

``PeerSource`` is an ``actors.ports.Source``: the relay actor iterates it, and
``reset()`` -- the relay's last local subscriber gone -- shuts the TCP
connection down before it returns, which the owner sees as its subscriber
leaving (and resets the upstream there if that was the last one). An owner
that dies closes its connections (the relay ends with ``OwnerLost`` at
once); one that freezes or whose host drops off the network does not, so
the owner sends an empty line on a stream silent for ``HEARTBEAT_S`` and a
relay that hears nothing for ``SILENCE_S`` gives up on it.

The other way round too: a follower that freezes or drops off the network
closes nothing either (and a frozen process's kernel still acknowledges
every byte sent to it), so the request carries a chunked body of one empty
line every ``HEARTBEAT_S`` for as long as the relay reads; the owner drops a
follower that sent nothing for ``SILENCE_S`` (gateway/cluster/routes.py).
The body ends once the relay has read the end line, before the owner ends
its answer, so the connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import structlog

from actors.deltas import Delta
from gateway.cluster.wire import LineDecoder, WireError
from gateway.errors import GatewayError

__all__ = [
    "CANCEL_PATH", "OWNER_HEADER", "OwnerLost", "PeerClient", "PeerSource", "PeerUnreachable",
    "STREAM_PATH",
]

log = structlog.get_logger("gateway.cluster")

STREAM_PATH = "/cluster/v1/streams/"
CANCEL_PATH = "/cluster/v1/requests/{request_id}/cancel"
#: Each member's own metrics (a worker's, where the shared port reaches any).
METRICS_PATH = "/cluster/v1/metrics"
#: Who may cancel (a hash of the client's credential, never the credential).
OWNER_HEADER = "X-Cluster-Owner"
CONNECT_TIMEOUT_S = 1.0
#: The owner writes an empty line to a peer stream silent this long...
HEARTBEAT_S = 1.0
#: ... so a relay that hears nothing for this long has lost its owner (a
#: frozen process, a partitioned host: nothing closes the connection).
SILENCE_S = 4.0


class OwnerLost(GatewayError):
    """The process that owned the stream went away mid-answer."""

    status = 502
    type = "upstream_error"
    code = "cluster_owner_lost"
    retryable = True


class PeerUnreachable(Exception):
    """The owner's address refused or did not answer the head in time."""


class Beat:
    """The relay's side of the liveness check: the request body, an empty
    line every ``HEARTBEAT_S`` until ``stop()`` (it is written by the
    response's own writer task, which closing the response cancels)."""

    __slots__ = ("_stopped",)

    def __init__(self) -> None:
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def lines(self) -> AsyncIterator[bytes]:
        while not self._stopped.is_set():
            yield b"\n"
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    await self._stopped.wait()
            except TimeoutError:
                pass


class PeerClient:
    def __init__(self, *, secret: str) -> None:
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._session: aiohttp.ClientSession | None = None
        self._refused_by: set[str] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                auto_decompress=False,
            )
        return self._session

    async def follow(self, owner_url: str, key: str) -> PeerSource | None:
        headers = self._headers
        beat = Beat()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                response = await self._client().get(
                    owner_url + STREAM_PATH + key, headers=headers, data=beat.lines()
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            beat.stop()
            raise PeerUnreachable(f"{owner_url} did not answer: {type(exc).__name__}") from exc
        if response.status == 200:
            return PeerSource(response, beat)
        beat.stop()
        response.release()
        if response.status == 404:
            return None
        if response.status == 401 and owner_url not in self._refused_by:
            # A configuration error, said once per member: every request
            # for a key that member owns is now served here instead.
            self._refused_by.add(owner_url)
            log.warning("a cluster member refused our CLUSTER_SECRET", member=owner_url)
        raise PeerUnreachable(f"{owner_url} answered {response.status}")

    async def cancel(self, owner_url: str, request_id: str, owner: str | None) -> bool:
        """Ask one member to cancel a request; True when it did (202)."""
        headers = dict(self._headers)
        if owner is not None:
            headers[OWNER_HEADER] = owner
        url = owner_url + CANCEL_PATH.format(request_id=quote(request_id, safe=""))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                async with self._client().post(url, headers=headers) as response:
                    return response.status == 202
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class PeerSource:
    __slots__ = (
        "_response", "_beat", "_decoder", "_pending", "_next", "_closed", "_transport",
        "_last_read", "_watchdog", "_silent",
    )

    def __init__(self, response: aiohttp.ClientResponse, beat: Beat) -> None:
        self._response = response
        self._beat = beat
        self._decoder = LineDecoder()
        self._pending: list[Delta] = []
        self._next = 0
        self._closed = False
        connection = response.connection
        self._transport = None if connection is None else connection.transport
        # A timer per relay every quarter of SILENCE_S, not one per read: a
        # read only notes when it returned (a silence is noticed after 1 to
        # 1.25 times SILENCE_S).
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        self._silent = False
        self._watchdog = loop.call_later(SILENCE_S / 4, self._watch)

    def _watch(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_read >= SILENCE_S:
            self._silent = True
            self.reset()  # the pending read ends; it raises OwnerLost
            return
        self._watchdog = loop.call_later(SILENCE_S / 4, self._watch)

    def _lost(self) -> OwnerLost:
        if self._silent:
            return OwnerLost(f"the process that owned this stream went silent for {SILENCE_S:g} s")
        return OwnerLost("the process that owned this stream went away")

    def __aiter__(self) -> PeerSource:
        return self

    async def __anext__(self) -> Delta:
        while self._next == len(self._pending):
            if self._closed:
                raise StopAsyncIteration
            if self._decoder.ended:
                failure = self._decoder.failure
                if failure is not None:
                    # Only now: the deltas read with it went first.
                    self.reset()
                    raise failure
                await self._finish()
                raise StopAsyncIteration
            self._pending.clear()
            self._next = 0
            try:
                data = await self._response.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                self.reset()
                raise self._lost() from exc
            if not data:
                self.reset()
                raise self._lost()
            self._last_read = asyncio.get_running_loop().time()
            try:
                self._pending.extend(self._decoder.feed(data))
            except WireError:
                self.reset()
                raise
        delta = self._pending[self._next]
        self._next += 1
        return delta

    async def _finish(self) -> None:
        """After the end line: read the body's end, so the connection goes
        back to the pool (a response released unread would close it). The
        request body ends first: the owner ends its answer once it has."""
        self._closed = True
        self._watchdog.cancel()
        self._beat.stop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                while await self._response.content.readany():
                    pass
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._response.close()
            return
        except asyncio.CancelledError:
            # The relay's last subscriber left meanwhile: its reset() was a
            # no-op (closed already), so the connection is closed here.
            self._response.close()
            raise
        self._response.release()

    def reset(self) -> None:
        """Leave the owner's stream: the connection is shut down (FIN sent)
        before this returns, not at the loop's next turn. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.cancel()
        self._beat.stop()
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is not None:
            # A transport's socket may refuse shutdown() (uvloop's does): a
            # duplicate of its descriptor reaches the same connection.
            try:
                with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                    raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()
