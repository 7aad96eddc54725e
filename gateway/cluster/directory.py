"""The directory: prompt key -> its owner (a Redis lease) or its failure.

Every call fails open: a Redis error or a reply slower than ``timeout_s``
(250 ms unless CLUSTER_REDIS_TIMEOUT_MS says otherwise)
marks the directory down (logged once, ``gateway_cluster_up`` 0) and the
caller serves locally; while it is down no request waits on it, and a probe
every ``PROBE_INTERVAL_S`` brings it back by itself. Leases are an efficiency
lock, not a correctness one: a lost lease costs at most one extra upstream
call, never a wrong answer, since a follower reads exactly one owner's log.
Every change to an entry is compare-and-set on the value (a Lua script), so
a process never deletes or renews another one's lease. A renewal sets a
missing key again, so an entry Redis lost (a FLUSHALL, a restart with an
empty instance) comes back at the owner's next renewal.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus, urlsplit

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.cluster.metrics import ClusterMetrics
from gateway.redact import REDACTED

log = structlog.get_logger("gateway.cluster")

T = TypeVar("T")

#: The longest a request waits on Redis before it is served locally
#: (CLUSTER_REDIS_TIMEOUT_MS).
TIMEOUT_S = 0.25
PROBE_INTERVAL_S = 1.0
MAX_CONNECTIONS = 64
KEY_PREFIX = "llmgw:key:"
#: A sorted set: member URL -> when its entry expires (Unix ms by Redis's
#: clock, TIME), refreshed
#: with the leases; read only to pass on a cancel this process cannot serve.
MEMBERS = "llmgw:members"
#: What a probe claims while the directory is down (kept a probe interval):
#: under the keys' prefix, which an ACL for the gateway allows, and no
#: prompt key's name (those are SHA-256 hex).
PROBE_KEY = KEY_PREFIX + "probe"
PROBE_EXPIRY_MS = int(PROBE_INTERVAL_S * 1000)

# Renew a lease: set the key again if it still names this process or is
# missing (Redis lost its data, or the stream started while Redis was down),
# never over another owner's entry or a failure. 1 when the key is ours.
_RENEW = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
# Record a failure: replace this process's entry, or set a missing key (a
# stream past its replay budget released its key before it failed), never
# over another owner's entry.
_REPLACE = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Take a key whose owner is gone: only if it still names that owner (or has
# expired meanwhile). Nil when taken; otherwise the value now there.
_TAKE_OVER = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return false
end
return current
"""


# The member list is timed by Redis's clock (TIME), the one every member
# shares: a host whose own clock is ahead would otherwise remove the others'
# fresh entries, and one behind would write entries the others read as gone.
_NOW_MS = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""
# List a member until the lease from now, and drop the entries expired.
_LIST_MEMBER = _NOW_MS + """
redis.call('zadd', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
return redis.call('zremrangebyscore', KEYS[1], '-inf', now_ms)
"""
# The members whose entries have not expired.
_MEMBERS = _NOW_MS + """
return redis.call('zrangebyscore', KEYS[1], now_ms, '+inf')
"""

_SCRIPTS = (_RENEW, _RELEASE, _REPLACE, _LIST_MEMBER, _MEMBERS)
#: What EVALSHA calls each script by (Redis computes the same SHA1).
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}


def _cancels_asked() -> int:
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def _raise_a_lost_cancel(cancels_before: int) -> None:
    """Raise the cancel of the running task that a Redis call returned
    over: redis-py (8.2) now and then hands a reply back from a task that
    was cancelled while it waited (a few calls in a hundred cancelled
    mid-pipeline), and a task that asks Redis in a loop -- the member's
    writer, the claims loop -- would then go on for ever, holding up the
    gateway's shutdown. The task's count of cancel requests still says
    that one was made; each ``asyncio.timeout`` of ours takes its own back."""
    task = asyncio.current_task()
    if task is not None and task.cancelling() > cancels_before:
        raise asyncio.CancelledError


class Unavailable(Exception):
    """The directory did not answer (in time): serve locally."""


def connect(url: str, timeout_s: float = TIMEOUT_S) -> Redis:
    """A client that never waits long: timeouts on connect and reply, no
    retries (the caller fails open instead), idle connections checked, and a
    bounded pool (a burst of new prompts queues for a connection, within the
    same timeout, rather than opening one each)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        decode_responses=False,
    )
    return Redis(connection_pool=pool)


def check_url(url: str) -> None:
    """ValueError unless redis-py can make a connection from ``url``: it
    reads the URL's options (``?socket_timeout=``, ``ssl_cert_reqs=``, ...)
    only then, so a bad one would otherwise fail every call. Makes one,
    unconnected. The error's message quotes no part of the URL (redis-py's
    own may: a password written where the port goes)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        # redis-py takes the digits of the path, or database 0 when there
        # are none: "/gateway" would be 0, and "/1/2" 12.
        if not re.fullmatch(r"/?\d*/?", unquote(parts.path)):
            raise ValueError("its path is the database number, such as /0")
        if re.search(r":0+$", parts.netloc):
            raise ValueError("port 0 is no address")
    try:
        pool = BlockingConnectionPool.from_url(url)
    except ValueError as exc:
        raise ValueError("redis-py cannot read its host, port, database or options") from exc
    try:
        pool.make_connection()  # type: ignore[no-untyped-call]
    except TypeError as exc:
        # The connection class refused an option it does not know.
        unknown = re.search(r"keyword argument '([^']+)'", str(exc))
        raise ValueError(
            f"redis-py takes no option {unknown[1]!r}" if unknown else "an option redis-py refuses"
        ) from exc
    except (ValueError, RedisError) as exc:
        raise ValueError("an option redis-py refuses") from exc


def redis_location(url: str) -> str:
    """The URL without credentials, for logs: no userinfo, and the value of
    a ``password`` query parameter (redis-py reads the password there too)
    redacted."""
    scheme, _, rest = url.partition("://")
    address, mark, query = rest.partition("?")
    params = [_redacted_param(param) for param in query.split("&")] if mark else []
    return f"{scheme}://{address.rpartition('@')[2]}{mark}{'&'.join(params)}"


def _redacted_param(param: str) -> str:
    name, _, _ = param.partition("=")
    return f"{name}={REDACTED}" if unquote_plus(name).lower() == "password" else param


class Directory:
    def __init__(
        self,
        client: Redis,
        *,
        lease_ms: int,
        metrics: ClusterMetrics,
        where: str,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self.lease_ms = lease_ms
        self._metrics = metrics
        self._where = where
        self._take_over = client.register_script(_TAKE_OVER)
        self.up = True
        self._down_since: float | None = None
        #: Claims waiting for the next pipeline (bounded by the requests
        #: in flight, each of which waits for its own).
        self._claims: list[tuple[str, bytes, asyncio.Future[bytes | None]]] = []
        self._claims_ready = asyncio.Event()
        #: Set once ``run_claims`` has ended: nothing would send a claim.
        self._claims_closed = False
        metrics.up.set(1)

    @staticmethod
    def key(prompt_key: str) -> str:
        return KEY_PREFIX + prompt_key

    # -- on a request's way (bounded, failing open) ------------------------------------

    async def claim(self, key: str, value: bytes) -> bytes | None:
        """``SET key value NX PX lease GET``: None when this process now owns
        the key, else the value already there. One round trip, shared: the
        claims made in one turn of the loop go out in one pipeline
        (``run_claims``), at ~13 µs of CPU each instead of ~50 alone."""
        if not self.up:
            raise Unavailable("the cluster directory is down")
        if self._claims_closed:
            raise Unavailable("the cluster directory is closing")
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._claims.append((key, value, future))
        self._claims_ready.set()
        return await future

    async def run_claims(self) -> None:
        """Send the waiting claims, a pipeline at a time, until cancelled."""
        batch: list[tuple[str, bytes, asyncio.Future[bytes | None]]] = []
        try:
            while True:
                await self._claims_ready.wait()
                self._claims_ready.clear()
                batch, self._claims = self._claims, []
                pipe = self._client.pipeline(transaction=False)
                for key, value, _ in batch:
                    pipe.set(self.key(key), value, nx=True, px=self.lease_ms, get=True)
                try:
                    replies = await self._call(pipe.execute())
                    answers = [None if reply is None else bytes(reply) for reply in replies]
                    if len(answers) != len(batch):
                        raise Unavailable("the pipeline's replies do not match its claims")
                except Exception as exc:
                    # Unavailable, or a reply of a shape we did not expect:
                    # this batch is served locally, and the loop goes on (a
                    # dead claim loop would hang every later claim).
                    if not isinstance(exc, Unavailable):
                        log.exception("claims to the cluster directory failed")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(Unavailable(str(exc)))
                    continue
                for (_, _, future), answer in zip(batch, answers, strict=True):
                    if not future.done():  # its request may have gone meanwhile
                        future.set_result(answer)
        finally:
            self._claims_closed = True
            # The batch on its way too: nobody reads its replies any more.
            for _, _, future in [*batch, *self._claims]:
                if not future.done():
                    future.set_exception(Unavailable("the cluster directory is closing"))
            self._claims.clear()

    async def take_over(self, key: str, gone: bytes, value: bytes) -> bytes | None:
        """Replace ``gone`` (an owner that does not answer) by ``value``:
        None when taken, else the value now there (someone else was faster)."""
        reply = await self._call(
            self._take_over(keys=[self.key(key)], args=[gone, value, self.lease_ms])
        )
        return None if reply is None else bytes(reply)

    # -- the owner's background work ------------------------------------------------

    async def write(self, ops: Iterable[tuple[str, str, bytes, Any]]) -> None:
        """One pipeline: ``("renew", key, mine, _)`` and ``("fail", key, mine,
        (entry, ttl_ms))``, each only if the key is ``mine`` or missing;
        ``("release", key, mine, _)`` only if still ``mine``;
        and ``("member", url, ...)`` / ``("leave", url, ...)`` for the member list.
        """
        commands: list[tuple[str, list[Any]]] = []
        leaving: list[str] = []
        for op, key, mine, extra in ops:
            name = self.key(key)
            if op == "member":
                commands.append((_LIST_MEMBER, [MEMBERS, key, self.lease_ms]))
            elif op == "leave":
                leaving.append(key)
            elif op == "renew":
                commands.append((_RENEW, [name, mine, self.lease_ms]))
            elif op == "release":
                commands.append((_RELEASE, [name, mine]))
            else:
                entry, ttl_ms = extra
                commands.append((_REPLACE, [name, mine, entry, ttl_ms]))
        if not commands and not leaving:
            return

        def fill(pipe: Pipeline) -> None:
            if leaving:
                pipe.zrem(MEMBERS, *leaving)
            for script, (name, *args) in commands:
                pipe.evalsha(_SHA[script], 1, name, *args)

        await self._run_scripts(fill)

    async def members(self) -> list[str]:
        """The URLs of the members whose entries have not expired."""
        [reply] = await self._run_scripts(lambda pipe: pipe.evalsha(_SHA[_MEMBERS], 1, MEMBERS))
        if isinstance(reply, Exception):
            raise Unavailable("the member list did not answer") from reply
        return [url.decode() if isinstance(url, bytes) else str(url) for url in reply]

    async def _run_scripts(self, fill: Callable[[Pipeline], object]) -> list[Any]:
        """One pipeline ``fill`` writes, its replies (errors among them).

        Scripts go by their SHA1 (EVALSHA): one round trip for the lot; on a
        Redis that does not know them yet (a restart), they are loaded and
        the pipeline is sent once more."""
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            fill(pipe)
            replies = await self._call(pipe.execute(raise_on_error=False))
            if attempt == 2 or not any(isinstance(r, NoScriptError) for r in replies):
                break
            await self._call(self._load_scripts())
        return replies

    async def _load_scripts(self) -> None:
        for script in _SCRIPTS:
            await self._client.script_load(script)

    async def probe(self) -> None:
        """While down: one claim of a key of its own, ``SET NX PX GET`` as
        every request sends; back up once Redis carries it out. A PING
        would take as back a Redis that answers but refuses every write (a
        replica, memory full, min-replicas-to-write unmet, a server older
        than 7.0), which the next request would mark down again: a flapping
        ``gateway_cluster_up``, two log lines a second, a Redis wait every
        second."""
        cancels = _cancels_asked()
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                await self._client.set(PROBE_KEY, b"", nx=True, px=PROBE_EXPIRY_MS, get=True)
        except (RedisError, OSError, TimeoutError):
            return
        _raise_a_lost_cancel(cancels)
        self._mark_up()

    async def aclose(self) -> None:
        await self._client.aclose(close_connection_pool=True)

    # -- internals -------------------------------------------------------------------

    async def _call(self, call: Awaitable[T]) -> T:
        if not self.up:
            if asyncio.iscoroutine(call):
                call.close()
            raise Unavailable("the cluster directory is down")
        started = time.perf_counter()
        cancels = _cancels_asked()
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_error()
            self._mark_down(exc)
            raise Unavailable("the cluster directory did not answer") from exc
        _raise_a_lost_cancel(cancels)
        self._metrics.redis_round_trip(time.perf_counter() - started)
        return reply

    def _mark_down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self._down_since = time.monotonic()
            self._metrics.up.set(0)
            # Once per outage, by cause; never the URL's credentials.
            log.warning(
                "cluster directory unavailable: coalescing locally until it is back",
                redis=self._where,
                error=type(exc).__name__,
            )

    def _mark_up(self) -> None:
        if not self.up:
            down_s = None if self._down_since is None else time.monotonic() - self._down_since
            self.up = True
            self._metrics.up.set(1)
            log.info("cluster directory back: coalescing across the cluster", redis=self._where,
                     down_s=None if down_s is None else round(down_s, 1))
