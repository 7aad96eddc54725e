"""``make_app(settings)``: the aiohttp application and what it owns.

One ``cleanup_ctx`` owns, in order of creation: the embedded simulator (when
no UPSTREAM_URL is set), the upstream transport, the admission queue, the
coalescing registry and the SSE keepalive task. Shutdown runs in reverse:
the keepalive stops, the registry ends every actor (resetting upstream
streams) before the transport closes its connections, and the simulator
goes last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry

from actors.registry import Registry
from gateway.admission import AdmissionQueue
from gateway.api import native, openai, ops
from gateway.config import Settings
from gateway.errors import QueueTimeout, ShuttingDown
from gateway.metrics import GatewayMetrics, LiveState
from gateway.middleware import add_request_id, envelope
from gateway.sse import Keepalive
from gateway.state import STATE, GatewayState
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.origin import Origin
from gateway.upstream.providers import get_provider
from gateway.upstream.source import SourceTimeouts
from gateway.upstream.transport import TransportOptions, make_transport

SETTINGS = web.AppKey("gateway_settings", Settings)
METRICS = web.AppKey("gateway_metrics", GatewayMetrics)


def make_app(settings: Settings) -> web.Application:
    # Bodies are read by the handlers with their own limit (413 in the OpenAI
    # shape); aiohttp's limit stays just above it as a backstop.
    app = web.Application(middlewares=[envelope], client_max_size=settings.max_body_bytes + 1)
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics(CollectorRegistry(auto_describe=True))
    app.cleanup_ctx.append(_gateway)
    app.on_response_prepare.append(add_request_id)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/stream", native.stream)
    ops.add_routes(app)
    return app


def _remember_failure(exc: BaseException) -> bool:
    # The error TTL is for the upstream's failures. Our own overload (a queue
    # timeout) and our own shutdown are not facts about the prompt.
    return not isinstance(exc, QueueTimeout | ShuttingDown)


async def _gateway(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    async with AsyncExitStack() as stack:
        if settings.upstream_url is None:
            # The embedded default: the simulator, in this process, over h2c.
            from gateway.sim.profile import SimProfile
            from gateway.sim.server import SimServer

            sim = SimServer(SimProfile())
            await sim.start()
            stack.push_async_callback(sim.aclose)
            upstream_url, protocol = sim.url, "h2c"
        else:
            upstream_url, protocol = settings.upstream_url, settings.upstream_protocol
        origin = Origin.parse(upstream_url)
        transport = make_transport(
            origin,
            protocol,
            TransportOptions(
                max_connections=settings.upstream_max_connections,
                connect_timeout=settings.upstream_connect_timeout_ms / 1000,
                first_byte_timeout=settings.upstream_first_token_timeout_ms / 1000,
                # Idle gaps are timed by the source, which knows a token from
                # a role chunk or a keepalive (gateway/upstream/source.py).
                idle_timeout=None,
            ),
        )
        stack.push_async_callback(transport.aclose)
        # Closed after the registry, which resets every source still open.
        deadlines = Deadlines()
        stack.callback(deadlines.close)
        admission = AdmissionQueue(
            max_inflight=settings.max_inflight,
            max_queue=settings.max_queue,
            queue_timeout_s=settings.queue_timeout_ms / 1000,
        )
        member = None
        if settings.redis_url is not None:
            from gateway.cluster.membership import join_cluster

            member = await join_cluster(
                settings, metrics.registry, stack, remember_failure=_remember_failure
            )
        registry = Registry(
            admission=admission,
            error_ttl_s=settings.error_ttl_ms / 1000,
            max_replay_bytes=settings.max_replay_bytes,
            coalesce_enabled=settings.coalesce_enabled,
            fanout_enabled=settings.stream_fanout_enabled,
            remember_failure=_remember_failure,
            on_reset=metrics.cancel.observe,
            observer=None if member is None else member.on_actor_event,
        )
        stack.push_async_callback(
            registry.aclose, ShuttingDown("the gateway is shutting down")
        )
        if member is not None:
            from gateway.cluster.membership import open_internal_listener

            await open_internal_listener(settings, member, registry, stack)
        keepalive = await stack.enter_async_context(Keepalive(settings.ping_interval_s).running())
        state = GatewayState(
            settings=settings,
            metrics=metrics,
            admission=admission,
            registry=registry,
            transport=transport,
            provider=get_provider(settings.upstream_format),
            base_path=origin.base_path,
            # Rebuilt from its parts: any user:password in UPSTREAM_URL stays out
            # of /readyz, the start-up line and the logs.
            upstream_url=origin.base_url + origin.base_path,
            keepalive=keepalive,
            source_timeouts=SourceTimeouts(
                first_token_s=settings.upstream_first_token_timeout_ms / 1000,
                idle_s=settings.upstream_idle_timeout_ms / 1000,
            ),
            deadlines=deadlines,
            cluster=member,
        )
        app[STATE] = state
        metrics.bind_live_state(
            LiveState(
                active_streams=lambda: state.active_streams,
                active_actors=lambda: registry.statistics().actors,
                queue_depth=lambda: admission.depth,
                upstream_connections=transport.connection_count,
                coalesce_leaders=lambda: registry.statistics().leaders_total,
                coalesce_followers=lambda: registry.statistics().followers_total,
                upstream_resets=lambda: registry.statistics().resets_total,
            )
        )
        yield


@asynccontextmanager
async def running_gateway(
    settings: Settings,
) -> AsyncIterator[tuple[web.Application, str]]:
    """Serve ``make_app(settings)`` on a real socket, as ``python -m gateway``
    does (handler cancellation on); yields the app and its base URL. For
    tests, benchmarks and the TTFT suite."""
    app = make_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = runner.addresses[0][1]
        yield app, f"http://{settings.host}:{port}"
    finally:
        await runner.cleanup()
