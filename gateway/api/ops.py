"""Operations: health, readiness, metrics, stats, models, cancel, the demo page."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.api.intake import owner_of
from gateway.errors import GatewayError, NotFound, UpstreamProtocolError
from gateway.metrics import percentile
from gateway.routing.config import ANY_MODEL
from gateway.routing.router import Upstream
from gateway.sse import dumps
from gateway.state import RECORD, STATE
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.origin import Origin
from gateway.upstream.source import read_bounded

STATIC = Path(__file__).resolve().parent.parent / "static"
#: A model list is small; a body past this is not one.
MAX_MODELS_BODY = 1 << 20


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining and some upstream whose circuit is not open
    accepts a TCP connection (each upstream serves some model). When every
    circuit is open the router tries them all anyway, and so does this."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    router = state.router
    checks = [up for up in router.upstreams if not router.circuit_open(up)]
    checks = checks or list(router.upstreams)
    results = await asyncio.gather(*(_reachable(up.public_url) for up in checks))
    upstreams = {up.name: result for up, result in zip(checks, results, strict=True)}
    upstreams.update({up.name: "circuit open" for up in router.upstreams if up not in checks})
    if "ok" in results:
        return web.json_response({"status": "ready", "upstreams": upstreams})
    detail = next((r for r in results if r != "ok"), "circuit open")
    return web.json_response(
        {"status": "upstream unreachable", "detail": detail, "upstreams": upstreams}, status=503
    )


async def _reachable(url: str) -> str:
    """"ok", or why not: the name of the error (never its text, which may
    carry the address of an internal host)."""
    origin = Origin.parse(url)
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(origin.host, origin.port)
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__
    writer.close()
    await writer.wait_closed()
    return "ok"


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
        "upstream_connections": sum(
            up.transport.connection_count() for up in state.router.upstreams
        ),
    }
    return web.json_response(body, dumps=dumps)


async def models(request: web.Request) -> web.Response:
    """The models, in OpenAI's shape whatever the provider: the union of the
    names the routing file gives and the lists of the upstreams serving any
    model ("*"; the one upstream of UPSTREAM_* is one). An upstream that
    cannot answer is left out, unless none could."""
    state = request.app[STATE]
    router = state.router
    listed: dict[str, str] = {}
    for upstream in router.upstreams:
        for model in upstream.config.models:
            if model != ANY_MODEL:
                listed.setdefault(model, upstream.provider.name)
    asked = [up for up in router.upstreams if ANY_MODEL in up.config.models]
    answers = await asyncio.gather(*(_upstream_models(up) for up in asked),
                                   return_exceptions=True)
    failure: BaseException | None = None
    for upstream, answer in zip(asked, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, GatewayError):
                raise answer
            failure = failure or answer
            continue
        for model in answer:
            listed.setdefault(model, upstream.provider.name)
    if not listed and failure is not None:
        raise failure
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": owner}
                     for i, owner in listed.items()],
        }
    )


async def _upstream_models(upstream: Upstream) -> list[str]:
    headers = upstream.provider.build_request(
        {"model": "", "messages": []},
        base_path=upstream.base_path,
        api_key=upstream.config.api_key or None,
    ).headers
    wanted = tuple((k, v) for k, v in headers if k in ("authorization", "x-api-key",
                                                       "anthropic-version"))
    stream = await upstream.transport.open(
        UpstreamRequest("GET", upstream.base_path + "/models",
                        wanted + (("accept", "application/json"),))
    )
    try:
        head = await stream.head()
        body = await read_bounded(stream, MAX_MODELS_BODY)
    finally:
        stream.release()
    if head.status != 200:
        raise upstream.provider.error_from_response(head, body)
    try:
        listed = json.loads(body)["data"]
        return [str(item["id"]) for item in listed]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamProtocolError("upstream model list is not in the expected shape") from exc


async def cancel(request: web.Request) -> web.Response:
    request[RECORD].api = "ops"
    request_id = request.match_info["request_id"]
    if not request.app[STATE].registry.cancel(request_id, owner=owner_of(request)):
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

