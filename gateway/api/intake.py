"""From an HTTP request to a subscription: body, validation, key, subscribe.

Shared by the OpenAI and native APIs. Everything that can refuse a request
(400, 413, 429) happens here, before any byte of a 200 is sent.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from actors.subscription import Subscription
from gateway.api.chat_request import ChatRequest, parse_chat_request
from gateway.errors import PayloadTooLarge, ShuttingDown, UnsupportedMediaType
from gateway.keys import prompt_key
from gateway.middleware import TENANT
from gateway.state import RECORD, STATE
from gateway.upstream.source import source_opener

#: How much of the key the log line shows: enough to correlate, not to replay.
KEY_PREFIX = 12


async def read_chat(request: web.Request) -> ChatRequest:
    state = request.app[STATE]
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another instance")
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'missing'}"
        )
    limit = state.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
        parts.append(chunk)
    return parse_chat_request(b"".join(parts))


async def subscribe(request: web.Request, chat: ChatRequest, *, streaming: bool) -> Subscription:
    """Join the stream for this prompt, or lead a new one. Raises QueueFull
    (429) when a new upstream call cannot even queue, before any byte of a
    200 is sent."""
    state = request.app[STATE]
    record = request[RECORD]
    tenant = request.get(TENANT) if state.settings.coalesce_scope == "key" else None
    key = prompt_key(chat.body, tenant=tenant)
    record.key_prefix = key[:KEY_PREFIX]
    # Built now, though only a leader sends it: a request the provider cannot
    # express (say, an audio part for Anthropic) must be a 400 before the 200
    # goes out, not a failure shared by a burst and kept for the error TTL.
    upstream_request = state.provider.build_request(
        chat.body, base_path=state.base_path, api_key=state.settings.upstream_api_key or None
    )
    open_source = source_opener(
        state.transport,
        state.provider,
        upstream_request,
        timeouts=state.source_timeouts,
        deadlines=state.deadlines,
        on_status=state.metrics.upstream_status,
    )
    coalesce = request.headers.get("X-Coalesce", "").lower() != "off"
    if state.cluster is None:
        subscription = state.registry.subscribe(
            key,
            open_source,
            request_id=record.request_id,
            arrived_at=record.arrived_at,
            streaming=streaming,
            coalesce=coalesce,
            resume_after=_last_event_id(request),
        )
    else:
        # Cluster mode: at most one Redis round trip decides where the answer
        # comes from (gateway/cluster/member.py).
        subscription = await state.cluster.subscribe(
            key,
            open_source,
            request_id=record.request_id,
            arrived_at=record.arrived_at,
            streaming=streaming,
            coalesce=coalesce,
            resume_after=_last_event_id(request),
        )
    subscription.owner = owner_of(request)
    record.role = subscription.role
    return subscription


def owner_of(request: web.Request) -> str | None:
    """Who may cancel a request by id: a hash of the client's credential
    (never the credential itself), or None when the client sent none."""
    tenant = request.get(TENANT)
    return None if tenant is None else hashlib.sha256(tenant.encode()).hexdigest()


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", "")
    # ASCII digits only ("²".isdigit() is true) and no more than a sequence
    # number can have: anything else is no resume point, not a 500.
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else 0
