"""``make_app(settings)``: the aiohttp application and what it owns.

One ``cleanup_ctx`` owns, in order of creation: the embedded simulator (when
neither UPSTREAM_URL nor GATEWAY_CONFIG is set), the router with one
transport per upstream, the exchange log, the admission queue, in cluster
mode the member of the Redis directory, the coalescing registry, the
cluster's internal listener and the SSE keepalive task. Shutdown runs in
reverse:
the keepalive stops, the registry ends every actor (resetting upstream
streams) before the exchange log writes their records and the transports
close their connections, and the simulator goes last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import unquote_plus, urlsplit

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from actors.actor import LagBound
from actors.registry import Registry
from gateway.admission import AdmissionQueue
from gateway.api import exchanges as exchanges_api
from gateway.api import messages, native, openai, ops
from gateway.config import ConfigError, Settings
from gateway.connection import Listener, listen_url
from gateway.errors import QueueFull, QueueTimeout, ShuttingDown, UpstreamError
from gateway.exchanges.log import exchange_log
from gateway.exchanges.store import StoreMisconfigured
from gateway.metrics import GatewayMetrics, LiveState
from gateway.middleware import EXCHANGES_PATH, add_request_id, envelope
from gateway.redact import SECRETS
from gateway.routing.setup import build_router, routing_for
from gateway.sse import Keepalive
from gateway.state import STATE, GatewayState
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.source import SourceTimeouts

log = structlog.get_logger("gateway")

SETTINGS = web.AppKey("gateway_settings", Settings)
METRICS = web.AppKey("gateway_metrics", GatewayMetrics)


def make_app(settings: Settings) -> web.Application:
    # Bodies are read by the handlers with their own limit (413 in the OpenAI
    # shape); aiohttp's limit stays just above it as a backstop.
    app = web.Application(middlewares=[envelope], client_max_size=settings.max_body_bytes + 1)
    # Kept out of every log line and every error a client sees: the keys,
    # and any password in a URL the gateway connects to.
    urls = (settings.upstream_url, settings.exchange_log_url, settings.redis_url)
    SECRETS.add(settings.upstream_api_key, *settings.gateway_api_keys, *settings.gateway_admin_keys,
                settings.cluster_secret, *(password for url in urls for password in _passwords(url)))
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics(CollectorRegistry(auto_describe=True))
    app.cleanup_ctx.append(_gateway)
    app.on_response_prepare.append(add_request_id)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/stream", native.stream)
    # Anthropic's Messages API, for its SDK's clients (Anthropic-shaped errors).
    app.router.add_post("/v1/messages", messages.messages)
    ops.add_routes(app)
    app.router.add_get(EXCHANGES_PATH, exchanges_api.list_exchanges)
    # The app's own registry, through prometheus_client's handler: it
    # negotiates OpenMetrics from Accept, and gzip from Accept-Encoding.
    app.router.add_get("/metrics", make_aiohttp_handler(app[METRICS].registry))
    return app


def source_timeouts(settings: Settings) -> SourceTimeouts:
    return SourceTimeouts(
        first_token_s=settings.upstream_first_token_timeout_ms / 1000,
        idle_s=settings.upstream_idle_timeout_ms / 1000,
    )


def _passwords(url: str | None) -> list[str]:
    """A URL's passwords: in its userinfo, or in a ``password`` query
    parameter (redis-py and libpq read it there too), as written and decoded."""
    if not url:
        return []
    parts = urlsplit(url)
    found = [parts.password or ""]
    for param in parts.query.split("&"):
        name, _, value = param.partition("=")
        if unquote_plus(name).lower() == "password":
            found += [value, unquote_plus(value)]
    return found


def remember_failure(exc: BaseException) -> bool:
    """Whether a shared stream's failure answers identical requests for the
    error TTL. That is for the upstream's failures: our own overload (an
    upstream's queue full, a queue timeout) and our own shutdown are not
    facts about the prompt, and a client retrying after Retry-After must not
    be answered from memory."""
    return not isinstance(exc, QueueFull | QueueTimeout | ShuttingDown)


def _upstream_failure_reporter(
    metrics: GatewayMetrics, upstream: str
) -> Callable[[BaseException, int], None]:
    """One warning line and one count per failed upstream stream, however
    many subscribers it had (a remembered failure answering later requests
    is not a new failure). Clients get the cause in our words
    (gateway.errors.for_client); the line keeps the whole story."""

    def report(exc: BaseException, subscribers: int) -> None:
        if not isinstance(exc, UpstreamError):
            return  # our own overload or shutdown: logged where it happens
        metrics.stream_failures.labels(exc.cause).inc()
        log.warning(
            "upstream failed",
            cause=exc.cause,
            code=exc.code,
            status=exc.status,
            detail=_detail(exc),
            upstream=upstream,
            subscribers=subscribers,
        )

    return report


def _detail(exc: BaseException) -> str:
    """The exception and its causes, one line: what the client is not told."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


async def _gateway(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    async with AsyncExitStack() as stack:
        if settings.upstream_url is None and settings.routing is None:
            # The embedded default: the simulator, in this process, over h2c.
            from gateway.sim.profile import SimProfile
            from gateway.sim.server import SimServer

            sim = SimServer(SimProfile())
            await sim.start()
            stack.push_async_callback(sim.aclose)
            upstream_url, protocol = sim.url, "h2c"
        else:
            upstream_url, protocol = settings.upstream_url or "", settings.upstream_protocol
        # -- the upstreams: one per [[upstream]], or the one of UPSTREAM_* ---------------
        router = build_router(
            routing_for(settings, url=upstream_url, protocol=protocol), settings, metrics
        )
        stack.push_async_callback(router.aclose)
        first = router.upstreams[0]
        # The keys the routing file's upstreams read from the environment.
        SECRETS.add(*(up.config.api_key for up in router.upstreams if up.config.api_key))
        # One URL, or name=URL for each upstream of the routing file.
        upstreams_named = (
            ",".join(f"{up.name}={up.public_url}" for up in router.upstreams)
            if router.config.from_file
            else first.public_url
        )
        # Closed after the registry, which resets every source still open.
        deadlines = Deadlines()
        stack.callback(deadlines.close)
        # The exchange log and the token counters. Entered before the
        # registry, so closed after it: the records of the streams it ends
        # at shutdown are written too.
        try:
            exchanges = await stack.enter_async_context(
                exchange_log(
                    url=settings.exchange_log_url,
                    keep_content=settings.exchange_log_content,
                    max_queue=settings.exchange_log_queue,
                    max_queue_bytes=settings.exchange_log_queue_bytes,
                    upstream=first.name,
                    registry=metrics.registry,
                )
            )
        except StoreMisconfigured as exc:
            # Found by the first connect, before any I/O: the operator's to
            # fix, not an outage to ride out (python -m gateway: exit 2).
            raise ConfigError("EXCHANGE_LOG_URL", str(exc), "(hidden)") from exc
        admission = AdmissionQueue(
            max_inflight=settings.max_inflight,
            max_queue=settings.max_queue,
            queue_timeout_s=settings.queue_timeout_ms / 1000,
        )
        member = None
        if settings.redis_url is not None:
            from gateway.cluster.membership import join_cluster

            member = await join_cluster(
                settings, metrics.registry, stack, remember_failure=remember_failure
            )
        registry = Registry(
            admission=admission,
            error_ttl_s=settings.error_ttl_ms / 1000,
            max_replay_bytes=settings.max_replay_bytes,
            coalesce_enabled=settings.coalesce_enabled,
            fanout_enabled=settings.stream_fanout_enabled,
            remember_failure=remember_failure,
            on_reset=metrics.cancel.observe,
            on_failure=_upstream_failure_reporter(metrics, upstreams_named),
            lag=LagBound(max_bytes=settings.stream_max_lag_bytes, max_s=settings.stream_max_lag_s),
            on_stream_end=exchanges.recorder.stream_ended,
            observer=None if member is None else member.on_actor_event,
        )
        stack.push_async_callback(
            registry.aclose, ShuttingDown("the gateway is shutting down")
        )
        if member is not None:
            from gateway.cluster.membership import open_internal_listener

            await open_internal_listener(
                settings, member, registry, stack, metrics.registry,
                draining=lambda: STATE in app and app[STATE].draining,
            )
        keepalive = await stack.enter_async_context(
            Keepalive(
                settings.ping_interval_s,
                first_token_interval_s=settings.first_token_ping_interval_ms / 1000,
                stall_s=settings.stream_max_lag_s,
            ).running()
        )
        state = GatewayState(
            settings=settings,
            metrics=metrics,
            admission=admission,
            registry=registry,
            upstream_url=upstreams_named,
            simulated=settings.upstream_url is None and settings.routing is None,
            router=router,
            keepalive=keepalive,
            source_timeouts=source_timeouts(settings),
            deadlines=deadlines,
            exchanges=exchanges,
            cluster=member,
        )
        app[STATE] = state
        metrics.bind_live_state(
            LiveState(
                active_streams=lambda: state.active_streams,
                active_actors=lambda: registry.statistics().actors,
                queue_depth=lambda: state.queue_depth,
                upstream_connections=lambda: sum(
                    up.transport.connection_count() for up in router.upstreams
                ),
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
    listener = make_listener(runner, settings)
    try:
        await listener.start(settings.host, settings.port)
        yield app, listen_url(settings.host, listener.port)
    finally:
        listener.stop_listening()
        await runner.cleanup()
        await listener.aclose()


def make_listener(runner: web.AppRunner, settings: Settings) -> Listener:
    """The listening socket, with the client deadlines of ``settings``."""
    return Listener(
        runner,
        idle_timeout_s=settings.client_idle_timeout_s,
        header_timeout_s=settings.client_header_timeout_s,
    )
