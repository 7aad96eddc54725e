"""Operations: health, readiness, stats, models, cancel, the demo page.

``/metrics`` is prometheus_client's own aiohttp handler, on the app's
registry (gateway/app.py).
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from gateway import json_codec
from gateway.api.intake import owner_of
from gateway.errors import GatewayError, NotFound, UpstreamProtocolError
from gateway.metrics import percentile
from gateway.routing.config import ANY_MODEL
from gateway.routing.router import Upstream
from gateway.sse import dumps
from gateway.state import STATE, GatewayState
from gateway.upstream.base import UpstreamRequest
from gateway.upstream.origin import Origin
from gateway.upstream.source import fetch

STATIC = Path(__file__).resolve().parent.parent / "static"
#: A model list is small; a body past this is not one.
MAX_MODELS_BODY = 1 << 20


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def upstream_kind(state: GatewayState) -> str:
    """"simulator" when no UPSTREAM_URL is set (made-up answers), else
    "configured". The URL itself stays out of these public answers."""
    return "simulator" if state.simulated else "configured"


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining and some upstream whose circuit is not open
    accepts a TCP connection (each upstream serves some model); a half-open
    one is checked too, as it takes a request (its probe). When every
    circuit is open the router tries them all anyway, and so does this."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    router = state.router
    checks = [up for up in router.upstreams if not router.in_cooldown(up)]
    checks = checks or list(router.upstreams)
    results = await asyncio.gather(*(_reachable(up.public_url) for up in checks))
    upstreams = {up.name: result for up, result in zip(checks, results, strict=True)}
    upstreams.update({up.name: "circuit open" for up in router.upstreams if up not in checks})
    kind = upstream_kind(state)
    if "ok" in results:
        return web.json_response({"status": "ready", "upstream": kind, "upstreams": upstreams})
    detail = next((r for r in results if r != "ok"), "circuit open")
    return web.json_response(
        {"status": "upstream unreachable", "detail": detail, "upstream": kind, "upstreams": upstreams},
        status=503,
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
        "queue_depth": state.queue_depth,
        "upstream_connections": sum(
            up.transport.connection_count() for up in state.router.upstreams
        ),
        "upstream": upstream_kind(state),
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


def _answer_timeout_s(state: GatewayState, upstream: Upstream) -> float:
    """How long one upstream may take over a small document: what it may
    take for a first token, as the document is its whole answer, sent at
    once."""
    timeout_s = upstream.config.first_token_s(state.settings.upstream_first_token_timeout_ms / 1000)
    assert timeout_s is not None  # bounded from outside, so bounded
    return timeout_s


async def _upstream_get(upstream: Upstream, path: str, timeout_s: float) -> tuple[int, bytes]:
    """GET a small JSON document from one upstream: (status, body), within
    ``timeout_s``. A non-2xx answer raises the provider's error, except 404,
    which the caller names."""
    # The headers of any chat request (its body is not sent): one the
    # provider can translate, so a question with one user message.
    headers = upstream.provider.build_request(
        {"model": "", "messages": [{"role": "user", "content": "?"}]},
        base_path=upstream.base_path,
        api_key=upstream.config.api_key or None,
    ).headers
    wanted = tuple((k, v) for k, v in headers if k in ("authorization", "x-api-key",
                                                       "anthropic-version"))
    head, body = await fetch(
        upstream.transport,
        UpstreamRequest("GET", upstream.base_path + path, wanted + (("accept", "application/json"),)),
        MAX_MODELS_BODY,
        timeout_s=timeout_s,
    )
    if head.status not in (200, 404):
        raise upstream.provider.error_from_response(head, body)
    return head.status, body


def _model_entry(item: object, provider: str) -> dict[str, object]:
    """One model in OpenAI's shape, from OpenAI's (``created`` in Unix
    seconds, ``owned_by``) or Anthropic's (``created_at`` in RFC 3339, no
    owner: the provider owns it). Raises KeyError/TypeError/ValueError on a
    shape that is neither."""
    if not isinstance(item, dict):
        raise TypeError("model entry is not an object")
    created = item.get("created")
    if not isinstance(created, int) or isinstance(created, bool):
        created_at = item.get("created_at")
        created = (
            int(datetime.fromisoformat(created_at).timestamp())
            if isinstance(created_at, str) else 0
        )
    owned_by = item.get("owned_by")
    return {
        "id": str(item["id"]),
        "object": "model",
        "created": created,
        "owned_by": owned_by if isinstance(owned_by, str) else provider,
    }


async def _upstream_models(state: GatewayState, upstream: Upstream) -> list[dict[str, object]]:
    status, body = await _upstream_get(upstream, "/models", _answer_timeout_s(state, upstream))
    try:
        if status != 200:
            raise ValueError(f"upstream answered {status}")
        return [_model_entry(item, upstream.provider.name) for item in json_codec.loads(body)["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamProtocolError("upstream model list is not in the expected shape") from exc


async def _all_models(
    state: GatewayState, failed: dict[Upstream, GatewayError] | None = None
) -> list[dict[str, object]]:
    """The union of the lists of the upstreams serving any model ("*"; the
    one upstream of UPSTREAM_* is one) and the names the routing file gives.
    An upstream that cannot answer is left out, unless none could; those in
    ``failed`` just could not, and are not asked again."""
    router = state.router
    failed = failed or {}
    asked = [up for up in router.upstreams if ANY_MODEL in up.config.models and up not in failed]
    answers = await asyncio.gather(*(_upstream_models(state, up) for up in asked),
                                   return_exceptions=True)
    found: dict[object, dict[str, object]] = {}
    failure: BaseException | None = next(iter(failed.values()), None)
    for answer in answers:
        if isinstance(answer, BaseException):
            if not isinstance(answer, GatewayError):
                raise answer
            failure = failure or answer
            continue
        for entry in answer:
            found.setdefault(entry["id"], entry)
    # The routing file's names first, as an upstream lists them if one does.
    listed: dict[object, dict[str, object]] = {}
    for upstream in router.upstreams:
        for name in upstream.config.models:
            if name != ANY_MODEL and name not in listed:
                listed[name] = found.pop(name, {
                    "id": name, "object": "model", "created": 0, "owned_by": upstream.provider.name
                })
    listed.update(found)
    if not listed and failure is not None:
        raise failure
    return list(listed.values())


async def models(request: web.Request) -> web.Response:
    """The models, in OpenAI's shape whatever the provider."""
    return web.json_response({"object": "list", "data": await _all_models(request.app[STATE])})


async def model(request: web.Request) -> web.Response:
    """One model (``models.retrieve``), asked by id of the upstreams that
    serve it: a list may be paginated (Anthropic's is), the model's own URL
    is not. Servers without that URL (a 404) are answered from the list,
    and so are those that cannot answer, left out as they are of it."""
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    failed: dict[Upstream, GatewayError] = {}
    for upstream in state.router.upstreams:
        if ANY_MODEL not in upstream.config.models:
            continue
        try:
            status, body = await _upstream_get(
                upstream, "/models/" + quote(model_id, safe=""), _answer_timeout_s(state, upstream)
            )
        except GatewayError as exc:
            failed[upstream] = exc
            continue
        if status == 404:
            continue
        try:
            entry = _model_entry(json_codec.loads(body), upstream.provider.name)
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamProtocolError("upstream model is not in the expected shape") from exc
        return web.json_response(entry)
    for entry in await _all_models(state, failed):
        if entry["id"] == model_id:
            return web.json_response(entry)
    raise NotFound(f"The model '{model_id}' does not exist", code="model_not_found")


async def cancel(request: web.Request) -> web.Response:
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


#: What /static/ serves: the files the demo page loads, a set fixed at start.
#: aiohttp's static route answers a missing file with an empty 404 of its
#: own, after the middleware has seen a 200: here it is the JSON 404.
STATIC_FILES = frozenset(
    path.name for path in STATIC.iterdir() if path.suffix in (".html", ".js", ".css")
)


async def static_file(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise NotFound("no such path")
    return web.FileResponse(STATIC / name)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/v1/models", models)
    # Model ids may hold a slash (``org/name``), sent encoded or not.
    app.router.add_get("/v1/models/{model_id:.+}", model)
    app.router.add_post("/v1/requests/{request_id}/cancel", cancel)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)

