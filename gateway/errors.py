"""The gateway's error hierarchy: one module, translated at the boundaries.

Lower layers raise these (with ``raise ... from exc`` so the cause survives);
the HTTP face turns any of them into the OpenAI error shape
``{"error": {"message", "type", "code"}}`` with ``status``, or into the
in-stream error of its API once the 200 has gone out. Messages never carry
secrets: callers build them from status codes and provider messages only.
"""

from __future__ import annotations


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


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


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


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"
    retryable = True


class UpstreamConnectionLost(UpstreamError):
    code = "upstream_connection_lost"
    retryable = True


class UpstreamStreamRefused(UpstreamError):
    """The stream never reached the provider's application (REFUSED_STREAM, or
    above a GOAWAY's last_stream_id; RFC 9113 §6.8): safe to send again."""

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


class UpstreamFirstByteTimeout(UpstreamTimeout):
    """A response head, then no body within the first-byte timeout: the
    source words it as its own first-token timeout, set from the same
    moment (gateway/upstream/source.py)."""


class UpstreamStatusError(UpstreamError):
    """The provider answered with an error status. 4xx keep their status (and a
    429 its Retry-After); 5xx become 502."""

    def __init__(
        self,
        upstream_status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message, code=code or f"upstream_{upstream_status}")
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        if 400 <= upstream_status < 500:
            self.status = upstream_status
            self.type = "rate_limit_error" if upstream_status == 429 else "invalid_request_error"
        self.retryable = upstream_status == 429 or upstream_status >= 500

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}
