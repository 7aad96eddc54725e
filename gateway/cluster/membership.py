"""Starting and stopping this process's membership (for ``gateway/app.py``).

``join_cluster`` builds the member before the registry exists (the registry
reports its actors' events to it); ``open_internal_listener`` starts the
listener other members read from, once the registry does. Shutdown, in the
app's exit stack: the listener stops, the registry ends every stream, the
member's last directory writes go out (releases, failures), and the Redis
and peer connections close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from actors.registry import Registry
from gateway.cluster.directory import Directory, connect, redis_location
from gateway.cluster.member import Member
from gateway.cluster.metrics import ClusterMetrics
from gateway.cluster.peer import PeerClient
from gateway.cluster.routes import internal_app
from gateway.config import Settings, cluster_listen_host
from gateway.connection import ListenError, listen_url

#: How long the internal listener waits for its streams when it stops (the
#: registry has ended them by then in a drain).
SHUTDOWN_TIMEOUT_S = 0.5
FINAL_WRITE_TIMEOUT_S = 1.0


async def join_cluster(
    settings: Settings,
    metrics_registry: CollectorRegistry,
    stack: AsyncExitStack,
    *,
    remember_failure: Callable[[BaseException], bool],
) -> Member:
    assert settings.redis_url is not None
    metrics = ClusterMetrics(metrics_registry)
    timeout_s = settings.cluster_redis_timeout_ms / 1000
    directory = Directory(
        connect(settings.redis_url, timeout_s),
        lease_ms=settings.cluster_lease_ms,
        metrics=metrics,
        where=redis_location(settings.redis_url),
        timeout_s=timeout_s,
    )
    member = Member(
        directory=directory,
        peers=PeerClient(secret=settings.cluster_secret),
        # Set for real once the internal listener is bound.
        advertise_url="",
        metrics=metrics,
        error_ttl_ms=settings.error_ttl_ms,
        remember_failure=remember_failure,
    )
    stack.push_async_callback(member.aclose)
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(member.run(), name="cluster-member"),
        loop.create_task(directory.run_claims(), name="cluster-claims"),
    ]

    async def stop_writer() -> None:
        await cancel_until_done(tasks)
        await member.flush(FINAL_WRITE_TIMEOUT_S)

    stack.push_async_callback(stop_writer)
    return member


#: How often a task that ran on after its cancel is cancelled again.
RECANCEL_INTERVAL_S = 0.1


async def cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for their end, cancelling again any that
    runs on. redis-py can swallow a cancel that lands inside one of its
    commands (redis/redis-py#2028, #2551): the task then goes on to its next
    await, and a gateway stopping would wait for it for ever."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the tasks end by cancellation, whatever they raised


async def open_internal_listener(
    settings: Settings, member: Member, registry: Registry, stack: AsyncExitStack,
    process_metrics: CollectorRegistry, *, draining: Callable[[], bool],
) -> str:
    """Bind the internal listener; returns the URL other members use.
    ``draining``: whether this process is draining (it then takes no new
    follower)."""
    member.registry = registry
    app = internal_app(
        registry, settings.cluster_secret, member.metrics, member.claiming, process_metrics,
        draining=draining,
    )
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    advertised = settings.cluster_advertise_url
    port = 0
    if advertised is not None and urlsplit(advertised).port is not None:
        # One port per worker: the advertised one plus the worker's index.
        port = (urlsplit(advertised).port or 0) + (settings.worker_index or 0)
    listen_host = cluster_listen_host(settings.host, advertised)
    site = web.TCPSite(runner, listen_host, port)
    try:
        await site.start()
    except OSError as exc:
        # The host is GATEWAY_HOST's for members on several hosts, else the
        # loopback address the advertised one names.
        host_setting = "GATEWAY_HOST" if listen_host == settings.host else "CLUSTER_ADVERTISE_URL"
        raise ListenError.from_os_error(
            exc, listen_host, port, setting="CLUSTER_ADVERTISE_URL (each worker adds its index)",
            host_setting=host_setting,
        ) from exc
    bound = runner.addresses[-1][1]
    if advertised is None:
        url = listen_url(listen_host, bound)
    else:
        parts = urlsplit(advertised)
        host = parts.hostname or settings.host
        if ":" in host:
            host = f"[{host}]"
        url = f"http://{host}:{bound}"
    member.advertise(url)
    return url
