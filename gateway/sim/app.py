"""The simulator's routes, shared by both protocol front ends.

Model endpoints (OpenAI chat completions, Anthropic messages) run the
per-request script in generate.py; the rest are small JSON answers: models,
health, and the admin view of the request log that tests and the TTFT suite
read (``GET``/``DELETE /admin/requests``, long-poll ``/admin/requests/wait``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from gateway.sim.formats import DEFAULT_MODEL, Format, error_body
from gateway.sim.generate import JSON_CONTENT_TYPE, serve_completion
from gateway.sim.limiter import FifoLimiter
from gateway.sim.log import OUTCOMES, Outcome, RequestLog
from gateway.sim.profile import SimProfile
from gateway.sim.sink import PeerGone, ResponseSink, SimRequest, respond

Route = Callable[[SimRequest, ResponseSink], Awaitable[None]]

_JSON_HEADERS = (("content-type", JSON_CONTENT_TYPE),)
_DEFAULT_WAIT_MS = 5000
MAX_REQUEST_BODY = 16 * 1024 * 1024

#: The simulator's models, as an upstream lists them: OpenAI's shape by
#: default, Anthropic's (``created_at`` in RFC 3339) to a client that sends
#: ``anthropic-version``.
MODELS: tuple[dict[str, Any], ...] = (
    {"id": DEFAULT_MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "upstream-sim"},
    {"id": "sim-org/sim-2", "object": "model", "created": 1_710_000_000, "owned_by": "sim-org"},
)
_ANTHROPIC_MODELS = tuple(
    {
        "type": "model",
        "id": model["id"],
        "display_name": model["id"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model["created"])),
    }
    for model in MODELS
)
_MODELS_PREFIX = "/v1/models/"


class BadQuery(ValueError):
    pass


def _query_int(request: SimRequest, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"query parameter {name!r} must be an integer") from None
    if value < 0:
        raise BadQuery(f"query parameter {name!r} must be >= 0")
    return value


class SimApp:
    """Routes requests; owns the request log and the concurrency limit."""

    def __init__(self, profile: SimProfile, log: RequestLog) -> None:
        self.profile = profile
        self.log = log
        self.limiter = FifoLimiter(profile.max_concurrency)
        #: Request bodies beyond this are answered 413, over both protocols.
        self.max_request_body = MAX_REQUEST_BODY
        self._routes: dict[str, dict[str, Route]] = {
            "/v1/chat/completions": {"POST": self._completion("openai")},
            "/v1/messages": {"POST": self._completion("anthropic")},
            "/v1/models": {"GET": self._models},
            "/healthz": {"GET": self._healthz},
            "/admin/requests": {"GET": self._list_requests, "DELETE": self._clear_requests},
            "/admin/requests/wait": {"GET": self._wait_requests},
        }

    async def handle(self, request: SimRequest, sink: ResponseSink) -> None:
        methods = self._routes.get(request.path)
        if methods is None and request.path.startswith(_MODELS_PREFIX):
            methods = {"GET": self._model}
        try:
            if methods is None:
                await _error(sink, 404, f"no route for {request.path}")
            elif (route := methods.get(request.method)) is None:
                await _error(sink, 405, f"{request.method} is not allowed on {request.path}")
            else:
                await route(request, sink)
        except PeerGone:
            pass  # nobody left to answer; a model request has logged it

    async def reject_too_large(self, sink: ResponseSink) -> None:
        """413 for a body over ``max_request_body`` (the front end stopped reading it)."""
        try:
            await _error(sink, 413, f"request body over {self.max_request_body} bytes")
        except PeerGone:
            pass

    def _completion(self, format: Format) -> Route:
        async def route(request: SimRequest, sink: ResponseSink) -> None:
            await serve_completion(
                format, request, sink, profile=self.profile, log=self.log, limiter=self.limiter
            )

        return route

    async def _models(self, request: SimRequest, sink: ResponseSink) -> None:
        if "anthropic-version" in request.headers:
            body: dict[str, Any] = {
                "data": list(_ANTHROPIC_MODELS),
                "has_more": False,
                "first_id": _ANTHROPIC_MODELS[0]["id"],
                "last_id": _ANTHROPIC_MODELS[-1]["id"],
            }
        else:
            body = {"object": "list", "data": list(MODELS)}
        await _json(sink, 200, body)

    async def _model(self, request: SimRequest, sink: ResponseSink) -> None:
        """``GET /v1/models/{id}`` (ids may hold a slash: ``org/name``)."""
        model_id = unquote(request.path[len(_MODELS_PREFIX):])
        anthropic = "anthropic-version" in request.headers
        models = _ANTHROPIC_MODELS if anthropic else MODELS
        for model in models:
            if model["id"] == model_id:
                await _json(sink, 200, model)
                return
        message = f"model {model_id!r} not found"
        await respond(
            sink, 404, _JSON_HEADERS, error_body("anthropic" if anthropic else "openai", 404, message)
        )

    async def _healthz(self, request: SimRequest, sink: ResponseSink) -> None:
        await _json(sink, 200, {"status": "ok"})

    async def _list_requests(self, request: SimRequest, sink: ResponseSink) -> None:
        await _json(sink, 200, {"requests": [r.to_json() for r in self.log.records]})

    async def _clear_requests(self, request: SimRequest, sink: ResponseSink) -> None:
        self.log.clear()
        await _json(sink, 200, {"requests": []})

    async def _wait_requests(self, request: SimRequest, sink: ResponseSink) -> None:
        """Long-poll until ``count`` records have ended (with ``outcome``)."""
        try:
            count = _query_int(request, "count", 1)
            timeout_ms = _query_int(request, "timeout_ms", _DEFAULT_WAIT_MS)
            outcome = _query_outcome(request)
        except BadQuery as exc:
            await _error(sink, 400, str(exc))
            return
        try:
            records = await self.log.wait_for(count, outcome=outcome, timeout=timeout_ms / 1000)
        except TimeoutError:
            ended = len(self.log.ended(outcome))
            await _error(sink, 408, f"{ended} of {count} records ended within {timeout_ms} ms")
            return
        await _json(sink, 200, {"requests": [r.to_json() for r in records]})


def _query_outcome(request: SimRequest) -> Outcome | None:
    text = request.query.get("outcome")
    if text is None:
        return None
    for outcome in OUTCOMES:
        if text == outcome and outcome != "pending":
            return outcome
    raise BadQuery(f"outcome must be one of {', '.join(OUTCOMES[1:])}")


async def _json(sink: ResponseSink, status: int, value: Any) -> None:
    await respond(sink, status, _JSON_HEADERS, json.dumps(value).encode())


async def _error(sink: ResponseSink, status: int, message: str) -> None:
    # Not a model endpoint, so no provider to imitate: the OpenAI shape, as
    # the gateway's own errors.
    await respond(sink, status, _JSON_HEADERS, error_body("openai", status, message))
