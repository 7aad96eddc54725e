"""Operations: health, readiness, metrics, stats, models, cancel, the demo page."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.api.intake import owner_of
from gateway.errors import NotFound, UpstreamProtocolError
from gateway.metrics import percentile
from gateway.sse import dumps
from gateway.state import RECORD, STATE, GatewayState
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.origin import Origin
from gateway.upstream.source import read_bounded

STATIC = Path(__file__).resolve().parent.parent / "static"
#: A model list is small; a body past this is not one.
MAX_MODELS_BODY = 1 << 20


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining and the upstream accepts a TCP connection."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    origin = Origin.parse(state.upstream_url)
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(origin.host, origin.port)
    except (OSError, TimeoutError) as exc:
        return web.json_response(
            {"status": "upstream unreachable", "detail": type(exc).__name__}, status=503
        )
    writer.close()
    await writer.wait_closed()
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    # prometheus-async's server_stats always reads the global REGISTRY; the
    # gateway keeps one registry per app, so it renders its own, negotiating
    # OpenMetrics the same way.
    registry = request.app[STATE].metrics.registry
    accept = request.headers.get("Accept", "")
    if "application/openmetrics-text" in accept:
        body = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        content_type = openmetrics.CONTENT_TYPE_LATEST
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    # Set whole: the exposition version parameter matters to strict scrapers.
    return web.Response(body=body, headers={"Content-Type": content_type})


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    windows = state.metrics.windows
    registry = state.registry.statistics()
    body = {
        "ttft_ms": {
            "p50": _ms(percentile(windows.ttft_s, 50)),
            "p95": _ms(percentile(windows.ttft_s, 95)),
            "samples": len(windows.ttft_s),
        },
        "queue_wait_ms": {
            "p95": _ms(percentile(windows.queue_wait_s, 95)),
            "samples": len(windows.queue_wait_s),
        },
        "error_rate": round(windows.error_ratio(), 4),
        "requests_in_window": len(windows.outcomes),
        "coalesce": {"leaders": registry.leaders_total, "followers": registry.followers_total},
        "active_streams": state.active_streams,
        "active_actors": registry.actors,
        "queue_depth": state.admission.depth,
        "upstream_connections": state.transport.connection_count(),
        "process": {
            "pid": os.getpid(),
            "worker": state.settings.worker_index or 0,
            "workers": state.settings.workers,
        },
        "cluster": _cluster_stats(state),
    }
    return web.json_response(body, dumps=dumps)


def _cluster_stats(state: GatewayState) -> dict[str, object]:
    member = state.cluster
    if member is None:
        return {"enabled": False}
    counts = member.counts
    return {
        "enabled": True,
        "up": member.directory.up,
        "advertise_url": member.me.url,
        "lease_ms": member.directory.lease_ms,
        "owned_keys": len(member.owned),
        "requests": {
            "owner": counts.owner,
            "local_follower": counts.local_follower,
            "remote_follower": counts.remote_follower,
        },
        "takeovers": counts.takeovers,
        "peer_streams_served": member.metrics.peer_streams_total,
        "redis_errors": member.metrics.redis_errors_total,
        "redis_ms": {
            "p50": _ms(percentile(member.metrics.redis_recent_s, 50)),
            "p95": _ms(percentile(member.metrics.redis_recent_s, 95)),
            "samples": len(member.metrics.redis_recent_s),
        },
    }


async def models(request: web.Request) -> web.Response:
    """The upstream's model list, in OpenAI's shape whatever the provider."""
    state = request.app[STATE]
    headers = state.provider.build_request(
        {"model": "", "messages": []},
        base_path=state.base_path,
        api_key=state.settings.upstream_api_key or None,
    ).headers
    wanted = tuple((k, v) for k, v in headers if k in ("authorization", "x-api-key",
                                                       "anthropic-version"))
    stream = await state.transport.open(
        UpstreamRequest("GET", state.base_path + "/models", wanted + (("accept", "application/json"),))
    )
    try:
        head = await stream.head()
        body = await read_bounded(stream, MAX_MODELS_BODY)
    finally:
        stream.release()
    if head.status != 200:
        raise state.provider.error_from_response(head, body)
    try:
        listed = json.loads(body)["data"]
        ids = [str(item["id"]) for item in listed]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamProtocolError("upstream model list is not in the expected shape") from exc
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": state.provider.name}
                     for i in ids],
        }
    )


async def cancel(request: web.Request) -> web.Response:
    request[RECORD].api = "ops"
    request_id = request.match_info["request_id"]
    state = request.app[STATE]
    owner = owner_of(request)
    # Cluster mode: the request may be streaming in another process.
    if not state.registry.cancel(request_id, owner=owner) and (
        state.cluster is None or not await state.cluster.cancel_elsewhere(request_id, owner)
    ):
        raise NotFound(f"no stream in flight with request id {request_id}")
    return web.json_response({"id": request_id, "status": "cancelled"}, status=202)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/requests/{request_id}/cancel", cancel)
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, append_version=False)

