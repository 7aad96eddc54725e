"""From an HTTP request to a subscription: body, validation, key, subscribe.

Shared by the OpenAI and native APIs. Everything that can refuse a request
(400, 413, 429) happens here, before any byte of a 200 is sent.
"""

from __future__ import annotations

import asyncio
import hashlib

import structlog
from aiohttp import web

from actors.ports import OpenSource
from actors.registry import RegistryClosed
from actors.subscription import Subscription
from gateway.api.chat_request import ChatRequest, parse_chat_request
from gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    UnsupportedMediaType,
)
from gateway.keys import prompt_key
from gateway.middleware import TENANT
from gateway.routing.retrying import retrying_opener
from gateway.state import RECORD, STATE, GatewayState

#: How much of the key the log line shows: enough to correlate, not to replay.
KEY_PREFIX = 12


async def read_chat(request: web.Request) -> ChatRequest:
    return parse_chat_request(await read_body(request))


async def read_body(request: web.Request) -> bytes:
    """The JSON body, within MAX_BODY_BYTES (413 past it, 415 if not JSON).
    A draining gateway refuses the request before the body, or once it is
    in if the drain began while it arrived."""
    state = request.app[STATE]
    _refuse_if_draining(state)
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {request.content_type or 'missing'}"
        )
    limit = state.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    timeout_s = state.settings.client_body_timeout_s
    try:
        # The whole body within the deadline: a Content-Length larger than
        # what is sent must not hold the connection forever.
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
                parts.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s") from exc
    except web.RequestPayloadError as exc:
        # aiohttp's payload parser: a malformed chunked body, say, or a
        # Content-Encoding the body does not have.
        raise BadRequest("the request body is not valid HTTP/1.1 framing",
                         code="invalid_http") from exc
    except RuntimeError as exc:
        # aiohttp's "Connection closed.": a read after the client closed its
        # connection with the body incomplete. It left: not our error.
        raise ConnectionResetError("the client left before its request body was complete") from exc
    _refuse_if_draining(state)
    return b"".join(parts)


def _refuse_if_draining(state: GatewayState) -> None:
    if state.draining:
        raise ShuttingDown("the gateway is shutting down; retry on another instance")


async def subscribe(
    request: web.Request, chat: ChatRequest, *, streaming: bool, resumable: bool = True
) -> Subscription:
    """Join the stream for this prompt, or lead a new one. Raises QueueFull
    (429) when a new upstream call cannot even queue, before any byte of a
    200 is sent. ``resumable``: whether a Last-Event-ID header may set the
    start."""
    state = request.app[STATE]
    record = request[RECORD]
    tenant = request.get(TENANT) if state.settings.coalesce_scope == "key" else None
    key = prompt_key(chat.body, tenant=tenant)
    record.key_prefix = key[:KEY_PREFIX]
    # Routed and built now, though only a leader sends it: an unknown model
    # is a 404, and a request a provider cannot express (say, an audio part
    # for Anthropic) a 400, before the 200 goes out -- not a failure shared by
    # a burst and kept for the error TTL.
    plan = state.router.plan(chat.body, chat.model)
    # The exchange log's view of the upstream call (one record per call,
    # whoever shares it): each attempt's source shows it the deltas it reads.
    recorder = None if state.exchanges is None else state.exchanges.recorder
    call = None if recorder is None else recorder.call(chat.body, chat.model)
    open_source: OpenSource = state.metrics.timed_open(
        retrying_opener(
            state.router, plan, timeouts=state.source_timeouts, deadlines=state.deadlines,
            observer=call,
        )
    )
    if call is not None:
        call.bind(open_source)
        open_source = call.open
    coalesce = request.headers.get("X-Coalesce", "").lower() != "off"
    owner = owner_of(request)  # before subscribing: see below
    try:
        if state.cluster is None:
            subscription = state.registry.subscribe(
                key,
                open_source,
                request_id=record.request_id,
                arrived_at=record.arrived_at,
                streaming=streaming,
                coalesce=coalesce,
                resume_after=_last_event_id(request) if resumable else 0,
            )
        else:
            # Cluster mode: at most one Redis round trip decides where the
            # answer comes from (gateway/cluster/member.py).
            subscription = await state.cluster.subscribe(
                key,
                open_source,
                request_id=record.request_id,
                arrived_at=record.arrived_at,
                streaming=streaming,
                coalesce=coalesce,
                resume_after=_last_event_id(request) if resumable else 0,
            )
    except RegistryClosed as exc:
        # The drain ended every stream while this one was being decided.
        raise ShuttingDown("the gateway is shutting down; retry on another instance") from exc
    # Nothing from here on may raise: until it is returned, a subscription
    # that leads holds an upstream call and an admission slot.
    if subscription.request_id != record.request_id:
        # The registry gave a fresh id: the one supplied names a live request.
        record.request_id = subscription.request_id
        structlog.contextvars.bind_contextvars(request_id=record.request_id)
    subscription.owner = owner
    if recorder is not None and call is not None:
        recorder.joined(call, subscription, owner)
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
