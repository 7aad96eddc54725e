"""The request envelope: id, client address, auth, errors, the canonical log line.

Every request gets an ``X-Request-Id`` (a trusted proxy's, or a new one), the
OpenAI error shape for anything that goes wrong before the 200, and exactly one
summary log line when it ends -- however it ends, cancellation included.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import secrets
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.config import CREDENTIAL
from gateway.connection import client_connection
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    for_client,
)
from gateway.metrics import APIS, outcome_of
from gateway.state import RECORD, STATE, RequestRecord

log = structlog.get_logger("gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Paths that need a client key when GATEWAY_API_KEYS is set. Health, metrics
#: and the demo page stay open (restrict /metrics at the proxy; deploy/nginx).
_PROTECTED_PREFIX = "/v1/"
TENANT = web.RequestKey("gateway_tenant", str)


#: The route of Anthropic's Messages API: its errors take Anthropic's shape.
ANTHROPIC_PATH = "/v1/messages"
EXCHANGES_PATH = "/v1/exchanges"
#: The model APIs by route, known before the handler runs: a request refused
#: at the door (401, 405, 413) counts under its API, as a 400 does.
API_OF_PATH = {"/v1/chat/completions": "openai", "/v1/stream": "native", ANTHROPIC_PATH: "anthropic"}


def speaks_anthropic(request: web.Request) -> bool:
    """Whether the request is one of Anthropic's Messages API: the route and
    the paths under it, which an Anthropic SDK calls too (``count_tokens``,
    batches) and whose refusals it reads in Anthropic's shape."""
    path = request.path
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def error_response(exc: GatewayError, *, anthropic: bool = False) -> web.Response:
    """The OpenAI error shape (Anthropic's on its route); the message as a
    client may see it."""
    exc = for_client(exc)
    body = exc.to_anthropic_json() if anthropic else exc.to_json()
    return web.json_response(body, status=exc.status, headers=exc.headers())


def _from_trusted_proxy(request: web.Request) -> bool:
    peer = request.remote
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in request.app[STATE].settings.trusted_proxies)


def _client_address(request: web.Request, trusted: bool) -> str | None:
    if trusted:
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            # The right-most entry is the one our proxy appended.
            return forwarded.rsplit(",", 1)[-1].strip()
    return request.remote


def _authenticate(request: web.Request) -> str | None:
    """The client's credential if valid; raises Unauthorized when keys are
    configured and none matches. Every configured key is compared, in
    constant time, so timing reveals neither a key nor its position."""
    header = request.headers.get("Authorization", "")
    presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
    presented = presented or request.headers.get("x-api-key", "").strip()
    # Anything but a token68 can match no key (config.CREDENTIAL): refused
    # here rather than hashed as a tenant or compared as bytes further on.
    if presented and not CREDENTIAL.fullmatch(presented):
        raise Unauthorized("malformed API key: a key is printable ASCII without spaces")
    settings = request.app[STATE].settings
    if not settings.gateway_api_keys:
        return presented or None
    # Admin keys (GATEWAY_ADMIN_KEYS) are client keys too.
    keys = settings.gateway_api_keys + settings.gateway_admin_keys
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    if not presented or not matched:
        raise Unauthorized("missing or unknown API key; send 'Authorization: Bearer <key>'")
    return presented


#: The status logged for a request whose client left before its answer began.
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    arrived_at = time.monotonic()
    # Parsing the peer address costs a little on every request: only when a
    # proxy header is there to be believed or not.
    trusted = (
        ("X-Request-Id" in request.headers or "X-Forwarded-For" in request.headers)
        and _from_trusted_proxy(request)
    )
    incoming_id = request.headers.get("X-Request-Id", "") if trusted else ""
    request_id = incoming_id if _REQUEST_ID.match(incoming_id) else secrets.token_hex(12)
    connection = client_connection(request)
    if connection is not None:
        connection.request_started(request)
    record = RequestRecord(
        request_id=request_id, arrived_at=arrived_at, api=API_OF_PATH.get(request.path, "ops")
    )
    request[RECORD] = record
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        if request.path.startswith(_PROTECTED_PREFIX):
            tenant = _authenticate(request)
            if tenant is not None:
                request[TENANT] = tenant
        response = await handler(request)
        record.status = response.status
        if response.status >= 400 and record.outcome == "ok":
            # An answer that is an error without raising one (/readyz's 503).
            record.outcome = outcome_of(response.status, "")
        return response
    except GatewayError as exc:
        record.status, record.error_code = exc.status, exc.code
        if record.outcome == "ok":
            record.outcome = outcome_of(exc.status, exc.code)
        return error_response(exc, anthropic=speaks_anthropic(request))
    except web.HTTPException as exc:
        translated = _translate_http_exception(exc)
        record.status, record.error_code = translated.status, translated.code
        record.outcome = "rejected"
        return error_response(translated, anthropic=speaks_anthropic(request))
    except asyncio.CancelledError:
        record.outcome = "cancelled"
        if record.bytes_sent == 0:
            record.status = CLIENT_CLOSED_REQUEST  # left before any answer began
        raise
    except ConnectionResetError:
        # The client left before an answer could start: nothing to write
        # to; counted and logged as a cancel (499: nginx's "client closed
        # request").
        record.status, record.outcome = CLIENT_CLOSED_REQUEST, "cancelled"
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except Exception:
        log.exception("unhandled error")
        record.status, record.outcome, record.error_code = 500, "error", "internal_error"
        return error_response(
            GatewayError("internal error", code="internal_error"),
            anthropic=speaks_anthropic(request),
        )
    finally:
        _finish(request, record, _client_address(request, trusted))


def _translate_http_exception(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such path")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(exc.allowed_methods)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body too large")
    error = GatewayError(exc.reason or "error", code=f"http_{exc.status}")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


def _finish(request: web.Request, record: RequestRecord, client: str | None) -> None:
    total_s = time.monotonic() - record.arrived_at
    state = request.app[STATE]
    if record.api in APIS:
        state.metrics.finished(record.api, record.outcome, total_s)
    # Every request but the ops endpoints' successful reads (health checks,
    # scrapes: noise every few seconds); a cancel by id is logged, and so is
    # a read of the exchange log, which shows other clients' calls.
    if (
        record.api != "ops"
        or record.status >= 400
        or request.method not in ("GET", "HEAD")
        or request.path == EXCHANGES_PATH
    ):
        log.info(
            "request",
            api=record.api,
            method=request.method,
            path=request.path,
            status=record.status,
            outcome=record.outcome,
            role=record.role,
            key=record.key_prefix,
            queue_wait_ms=record.queue_wait_ms,
            ttft_ms=record.ttft_ms,
            total_ms=round(total_s * 1000, 2),
            bytes=record.bytes_sent,
            client=client,
            error=record.error_code,
        )
    structlog.contextvars.unbind_contextvars("request_id")


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streaming ones included, carries
    the id (a middleware could not add it after a stream's headers left)."""
    record = request.get(RECORD)
    if record is not None:
        response.headers["X-Request-Id"] = record.request_id
