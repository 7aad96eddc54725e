"""The gateway's error hierarchy: one module, translated at the boundaries.

Lower layers raise these (with ``raise ... from exc`` so the cause survives);
the upstream transports have their own errors, by cause and without HTTP
statuses (``gateway.upstream.errors``), which the source translates here;
the HTTP face turns any of them into the OpenAI error shape
``{"error": {"message", "type", "code"}}`` with ``status``, or into the
in-stream error of its API once the 200 has gone out. Messages never carry
secrets: callers build them from status codes and provider messages only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import parsedate_to_datetime

from gateway.redact import redact


class GatewayError(Exception):
    """Base: an HTTP status, an OpenAI error type and code, a safe message."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    #: Whether a client may retry the same request and expect it to work.
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After) for the error response."""
        return {}

    def to_json(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def to_anthropic_json(self) -> dict[str, object]:
        """Anthropic's error shape (API reference, "Errors"), for the
        Messages API: its SDK picks the exception by status, shows the type."""
        kind = _ANTHROPIC_TYPES.get(self.status)
        if kind is None:
            kind = "api_error" if self.status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": kind, "message": self.message}}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


# -- the client's fault -------------------------------------------------------


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    """A valid key that may not do this (an admin route without an admin key)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """No configured upstream serves the requested model (OpenAI's shape)."""

    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    """With the methods the route takes, in an Allow header (RFC 9110 §15.5.6)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = ", ".join(sorted(allowed))
        super().__init__(f"method not allowed; allowed: {self.allowed}")

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RequestTimeout(GatewayError):
    """The request body did not arrive in time (nginx answers 408 too)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UnsupportedMediaType(GatewayError):
    # The architecture's table has no 415; a wrong content type is a bad request.
    status = 400
    type = "invalid_request_error"
    code = "unsupported_content_type"


# -- admission ----------------------------------------------------------------


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ReaderTooSlow(GatewayError):
    """A client read its stream so slowly that it fell past the lag bound
    (STREAM_MAX_LAG_BYTES / STREAM_MAX_LAG_S); only ever in-stream."""

    status = 503
    type = "server_error"
    code = "slow_reader"


class QueueTimeout(GatewayError):
    status = 503
    type = "server_error"
    code = "queue_timeout"
    retryable = True


class ShuttingDown(GatewayError):
    status = 503
    type = "server_error"
    code = "shutting_down"
    retryable = True


class ExchangeLogUnavailable(GatewayError):
    """The exchange log's database cannot be read right now."""

    status = 503
    type = "server_error"
    code = "exchange_log_unavailable"
    retryable = True


# -- the way out --------------------------------------------------------------


class UpstreamError(GatewayError):
    """The provider failed us: connection, protocol or an error status."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    @property
    def cause(self) -> str:
        """The failure's kind in the gateway's own codes: a bounded set,
        fit for a metric label (a provider's codes are not)."""
        return self.code


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"
    retryable = True


class UpstreamConnectionLost(UpstreamError):
    code = "upstream_connection_lost"
    retryable = True


class UpstreamStreamRefused(UpstreamError):
    """The stream never reached the provider's application (REFUSED_STREAM, or
    above a GOAWAY's last_stream_id; RFC 9113 §6.8), and the HTTP/2 pool's
    own attempts to send it again were refused too."""

    code = "upstream_stream_refused"
    retryable = True


class UpstreamStreamReset(UpstreamError):
    code = "upstream_stream_reset"
    retryable = True


class UpstreamProtocolError(UpstreamError):
    """Bytes we cannot make sense of: malformed HTTP/2, SSE or JSON."""

    code = "upstream_protocol_error"


class UpstreamProtocolMismatch(UpstreamError):
    """TLS ALPN chose another protocol than HTTP/2 (RFC 7301): with
    ``UPSTREAM_PROTOCOL=auto`` the transport falls back to HTTP/1.1."""

    code = "upstream_protocol_mismatch"

    def __init__(self, message: str, *, negotiated: str | None) -> None:
        super().__init__(message)
        self.negotiated = negotiated


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"
    retryable = True


#: The upstream refused the gateway's own credentials (a wrong or revoked
#: upstream key): an upstream error, not the client's 401.
UPSTREAM_AUTH_STATUSES = frozenset({401, 403})


#: A provider's error code that is passed on: an identifier, as providers
#: write them ("context_length_exceeded", "rate_limit_error").
_PROVIDER_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: Retry-After as delay-seconds (RFC 9110 §10.2.3); the other form is an HTTP-date.
_DELAY_SECONDS = re.compile(r"[0-9]{1,9}")


def provider_code(code: str | None) -> str | None:
    """``code`` if it is an identifier holding no configured secret, else None.

    It reaches clients, the exchange log and other cluster members as it
    is; a provider's code is an identifier, and anything else (text, a
    value echoing a request header) is not relayed."""
    if code is None or not _PROVIDER_CODE.fullmatch(code) or redact(code) != code:
        return None
    return code


def retry_after_value(value: str | None) -> str | None:
    """``value`` if it is a Retry-After value (delay-seconds or an HTTP-date),
    else None: it goes out as a response header and into the cluster's
    shared failure as it is."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return value
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return value if redact(value) == value and value.isprintable() else None


class UpstreamStatusError(UpstreamError):
    """The provider answered with an error status. 4xx keep their status (and a
    429 its Retry-After), but 401 and 403, which are about the gateway's own
    key, not the client's: they become 502 ``upstream_auth_error``, as 5xx
    become 502. The provider's code and Retry-After are kept only when they
    are what they claim to be (``provider_code``, ``retry_after_value``)."""

    def __init__(
        self,
        upstream_status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        if upstream_status in UPSTREAM_AUTH_STATUSES:
            # Not the provider's code either ("invalid_api_key" would tell
            # the client its own key is wrong).
            code = "upstream_auth_error"
        super().__init__(message, code=provider_code(code) or f"upstream_{upstream_status}")
        self.upstream_status = upstream_status
        self.retry_after = retry_after_value(retry_after)
        if 400 <= upstream_status < 500 and upstream_status not in UPSTREAM_AUTH_STATUSES:
            self.status = upstream_status
            self.type = "rate_limit_error" if upstream_status == 429 else "invalid_request_error"
        self.retryable = upstream_status == 429 or upstream_status >= 500

    @property
    def cause(self) -> str:
        if self.upstream_status in UPSTREAM_AUTH_STATUSES:
            return "upstream_auth_error"
        return f"upstream_{self.upstream_status}"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}


# -- the boundary ---------------------------------------------------------------

#: What a client is told of an upstream failure: its cause, in our words. The
#: exception's own text -- the upstream's host:port, a library's exception
#: name, the decoder's view of a body that was not an event stream -- goes to
#: the log (the actor's failure line), never to a client.
_UPSTREAM_WORDS: dict[type[UpstreamError], str] = {
    UpstreamConnectError: "the gateway could not connect to the upstream",
    UpstreamConnectionLost: "the connection to the upstream was lost",
    UpstreamStreamRefused: "the upstream refused the request; retry",
    UpstreamStreamReset: "the upstream ended the answer abruptly",
    UpstreamProtocolError: "the upstream sent an answer the gateway could not read",
    UpstreamProtocolMismatch: "the upstream does not speak the configured protocol",
    UpstreamTimeout: "the upstream did not answer in time",
}

#: What a client is told of an upstream refusing the gateway's key.
UPSTREAM_AUTH_MESSAGE = "the upstream refused the gateway's credentials"

#: A provider's message longer than this, or looking like a page, is not
#: relayed: the status says it in our words instead.
_MAX_RELAYED_MESSAGE = 500


class ClientError(GatewayError):
    """An error as a client sees it: the status, type, code, retryability and
    headers of ``source``, with a message safe to send."""

    def __init__(self, source: GatewayError, message: str) -> None:
        super().__init__(message, code=source.code)
        self.status = source.status
        self.type = source.type
        self.retryable = source.retryable
        self._headers = source.headers()
        self.__cause__ = source

    def headers(self) -> dict[str, str]:
        return self._headers


def for_client(exc: GatewayError) -> GatewayError:
    """``exc`` as it may be sent to a client, before the 200 or in-stream.

    Every message loses the configured secrets (gateway/redact.py); an
    upstream failure's message is replaced by its cause in our words, except
    a provider's own error message for an error status (it tells the client
    what to fix: "maximum context length is 8192 tokens"), which is relayed
    when it reads as a message and not as a page, and is not the upstream
    refusing the gateway's key.
    """
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, UpstreamStatusError):
        if exc.upstream_status in UPSTREAM_AUTH_STATUSES:
            # The provider's words are about our key ("Incorrect API key
            # provided: sk-proj-****wxyz"): they would tell the client its
            # own key is wrong and show a fingerprint of ours. The warning
            # line keeps them (gateway/app.py).
            return ClientError(exc, UPSTREAM_AUTH_MESSAGE)
        message = exc.message.strip()
        if not message or len(message) > _MAX_RELAYED_MESSAGE or "<" in message:
            message = f"the upstream answered {exc.upstream_status}"
        return ClientError(exc, redact(message))
    if isinstance(exc, UpstreamError):
        return ClientError(exc, _upstream_words(exc))
    return ClientError(exc, redact(exc.message))


def _upstream_words(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        if "first token" in exc.message:
            return "the upstream sent no first token in time"
        if "idle" in exc.message:
            return "the upstream stopped sending within the answer for too long"
    for cls in type(exc).__mro__:
        words = _UPSTREAM_WORDS.get(cls)
        if words is not None:
            return words
    return "the upstream failed"
