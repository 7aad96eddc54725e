"""GET /v1/exchanges: the exchange log, newest first, in OpenAI's list shape.

``limit`` (1-1000, default 20), ``before`` (an exchange id: the page after
it) and ``model`` (exact). When GATEWAY_ADMIN_KEYS is set, only those keys
may read it; with client keys (GATEWAY_API_KEYS) and no admin key nobody
may: an exchange tells what other clients asked.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from aiohttp import web

from gateway.errors import BadRequest, ExchangeLogUnavailable, Forbidden, NotFound, Unauthorized
from gateway.exchanges.store import MAX_LIMIT, StoreError
from gateway.middleware import TENANT
from gateway.sse import dumps
from gateway.state import STATE

DEFAULT_LIMIT = 20


def _authorize(request: web.Request) -> None:
    settings = request.app[STATE].settings
    admin_keys = settings.gateway_admin_keys
    if not admin_keys:
        if settings.gateway_api_keys:
            raise Forbidden("the exchange log needs an admin key; none is set (GATEWAY_ADMIN_KEYS)")
        return
    presented = request.get(TENANT, "")
    matched = False
    for key in admin_keys:  # every one, in constant time (as the middleware does)
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    if matched:
        return
    if not presented:
        raise Unauthorized("the exchange log needs an admin key; send 'Authorization: Bearer <key>'")
    if settings.gateway_api_keys:
        raise Forbidden("this key may not read the exchange log")
    raise Unauthorized("unknown admin key")


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_LIMIT}", code="invalid_value")
    return int(raw)


def _text(query: Mapping[str, str], name: str) -> str | None:
    """A text parameter; None when absent or empty. NUL is text no store
    holds (none is stored: ``rows.storable``) and PostgreSQL refuses it."""
    raw = query.get(name) or None
    if raw is not None and "\x00" in raw:
        raise BadRequest(f"'{name}' must not contain NUL", code="invalid_value")
    return raw


async def list_exchanges(request: web.Request) -> web.Response:
    _authorize(request)
    exchanges = request.app[STATE].exchanges
    writer = None if exchanges is None else exchanges.writer
    if writer is None:
        raise NotFound("the exchange log is off; set EXCHANGE_LOG_URL", code="exchange_log_off")
    query = request.query
    limit = _limit(query.get("limit"))
    before = _text(query, "before")
    model = _text(query, "model")
    try:
        data = await writer.store.recent(limit=limit, before=before, model=model)
    except StoreError as exc:
        raise ExchangeLogUnavailable("the exchange log cannot be read right now") from exc
    return web.json_response({"object": "list", "data": data}, dumps=dumps)
