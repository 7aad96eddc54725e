"""From settings to a running ``Router``: one transport per upstream.

Without GATEWAY_CONFIG the one upstream of UPSTREAM_* (or the embedded
simulator) is a routing table of one, named ``default``, serving any model.
It retries only what never reached the model or broke before the first
token (connect failure, a refused stream, a connection lost): an error
status still reaches the client as it always did, with its Retry-After.
"""

from __future__ import annotations

import dataclasses

from gateway.admission import AdmissionQueue
from gateway.config import Settings
from gateway.metrics import GatewayMetrics, UpstreamGauges
from gateway.routing.breaker import CircuitBreaker
from gateway.routing.config import RetryConfig, RoutingConfig, UpstreamConfig
from gateway.routing.router import Router, Upstream
from gateway.upstream.origin import Origin
from gateway.upstream.providers import get_provider
from gateway.upstream.transport import TransportOptions, make_transport

#: The name of the one upstream of the environment setup.
DEFAULT_UPSTREAM = "default"
#: Per-upstream admission: how many may wait for a slot of a full upstream.
UPSTREAM_QUEUE = 1024


def routing_for(settings: Settings, *, url: str, protocol: str) -> RoutingConfig:
    """The file's routing, or a table of one for the environment setup
    (``url``/``protocol``: UPSTREAM_URL's, or the embedded simulator's)."""
    if settings.routing is not None:
        return settings.routing
    upstream = UpstreamConfig(
        name=DEFAULT_UPSTREAM,
        url=url,
        format=settings.upstream_format,
        protocol=protocol,
        api_key=settings.upstream_api_key,
    )
    retry = dataclasses.replace(RetryConfig(), max_attempts=2, retry_statuses=frozenset())
    return RoutingConfig((upstream,), retry, from_file=False)


def build_router(routing: RoutingConfig, settings: Settings, metrics: GatewayMetrics) -> Router:
    upstreams = [_upstream(config, routing, settings, metrics) for config in routing.upstreams]
    router = Router(routing, upstreams, observer=metrics)
    metrics.bind_upstreams(
        lambda: [
            UpstreamGauges(
                name=up.name,
                circuit_open=router.circuit_open(up),
                in_flight=up.in_flight - up.waiting,
                connections=up.transport.connection_count(),
            )
            for up in router.upstreams
        ]
    )
    return router


def transport_options(
    settings: Settings,
    *,
    max_connections: int | None = None,
    first_token_timeout_ms: int | None = None,
) -> TransportOptions:
    """A transport's options from the settings, and an upstream's own limits
    where its table sets them. A stream slot (HTTP/2) or a response head
    (HTTP/1.1) is waited for at most as long as a first token may take; an
    attempt bounds that wait by what is left of its request's first-token
    deadline as well (``RetryingSource.open``)."""
    first_token_ms = first_token_timeout_ms or settings.upstream_first_token_timeout_ms
    return TransportOptions(
        max_connections=max_connections or settings.upstream_max_connections,
        connect_timeout=settings.upstream_connect_timeout_ms / 1000,
        wait_timeout=first_token_ms / 1000,
        ping_interval=settings.upstream_ping_interval_s,
        ping_timeout=settings.upstream_ping_timeout_s,
        max_streams_per_connection=settings.upstream_max_streams_per_connection,
    )


def _upstream(
    config: UpstreamConfig, routing: RoutingConfig, settings: Settings, metrics: GatewayMetrics
) -> Upstream:
    origin = Origin.parse(config.url)
    transport = make_transport(
        origin,
        config.protocol,
        transport_options(
            settings,
            max_connections=config.max_connections,
            first_token_timeout_ms=config.first_token_timeout_ms,
        ),
    )
    admission = None
    if config.max_inflight:
        admission = AdmissionQueue(
            max_inflight=config.max_inflight,
            max_queue=UPSTREAM_QUEUE,
            queue_timeout_s=settings.upstream_first_token_timeout_ms / 1000,
        )
    name = config.name
    return Upstream(
        config=config,
        transport=transport,
        provider=get_provider(config.format),
        base_path=origin.base_path,
        # Rebuilt from its parts: any user:password in the URL stays out of
        # /readyz, the start-up line and the logs.
        public_url=origin.base_url + origin.base_path,
        breaker=CircuitBreaker(
            failures=routing.retry.circuit_failures,
            cooldown_s=routing.retry.circuit_cooldown_ms / 1000,
        ),
        admission=admission,
        on_status=lambda status: metrics.upstream_status(status, name),
    )
