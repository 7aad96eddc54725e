"""GET /v1/exchanges: the exchange log, newest first, in OpenAI's list shape.

``limit`` (1-1000, default 20), ``before`` (an exchange id: the page after
it) and ``model`` (exact). A page also stops before ``MAX_PAGE_BYTES`` of
JSON (with content on, 1000 records may hold gigabytes); ``has_more`` says
whether more follow, to be read with ``before`` the page's last id.

When GATEWAY_ADMIN_KEYS is set, only those keys may read it; with client
keys (GATEWAY_API_KEYS) and no admin key nobody may: an exchange tells
what other clients asked.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway import json_codec
from gateway.errors import BadRequest, ExchangeLogUnavailable, Forbidden, NotFound, Unauthorized
from gateway.exchanges.store import MAX_LIMIT, StoreError
from gateway.middleware import TENANT
from gateway.state import STATE

DEFAULT_LIMIT = 20
#: A page's JSON stops before this many bytes (documented in docs/exchange-log.md).
MAX_PAGE_BYTES = 4 * 1_048_576


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
        # One more than asked: whether there are more is known, not guessed.
        data = await writer.store.recent(limit=limit + 1, before=before, model=model)
    except StoreError as exc:
        raise ExchangeLogUnavailable("the exchange log cannot be read right now") from exc
    # Encoding a page with content is long work: off the event loop.
    body = await asyncio.to_thread(page_body, data, limit)
    return web.Response(body=body, content_type="application/json")


def page_body(exchanges: Sequence[dict[str, Any]], limit: int) -> bytes:
    """``{"object": "list", "data": [...], "has_more": ...}`` as JSON: up
    to ``limit`` exchanges, stopping before the one that would take the page
    past ``MAX_PAGE_BYTES`` (the first is always in, whatever its size)."""
    parts: list[bytes] = []
    size = 0
    for exchange in exchanges[:limit]:
        part = json_codec.dumps(exchange)
        if parts and size + len(part) > MAX_PAGE_BYTES:
            break
        parts.append(part)
        size += len(part) + 1
    has_more = b"true" if len(parts) < len(exchanges) else b"false"
    return b'{"object":"list","data":[' + b",".join(parts) + b'],"has_more":' + has_more + b"}"
