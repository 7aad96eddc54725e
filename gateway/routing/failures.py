"""What a failed attempt says, read from the gateway's own errors.

The transports translate their exceptions into ``gateway.errors`` once, at
their boundary; routing decides on those (their class and, for a status, the
upstream's status), never on a transport's internals.
"""

from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass

from gateway.errors import (
    UPSTREAM_AUTH_STATUSES,
    QueueFull,
    QueueTimeout,
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamStreamRefused,
    UpstreamStreamReset,
    UpstreamTimeout,
)

#: Failure kinds, the ``reason``/``kind`` label values.
KINDS = ("connect", "refused", "connection_lost", "reset", "timeout", "429", "5xx", "auth",
         "4xx", "protocol", "busy", "after_first_token", "other", "internal")


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str
    #: The upstream's status when it answered with one: "429", "5xx", "auth",
    #: "4xx", or "other" (a redirect, say).
    status: int | None = None
    #: A 429's (or 503's) Retry-After, in seconds.
    retry_after_s: float | None = None

    @property
    def upstream_at_fault(self) -> bool:
        """Whether it counts against the upstream's health (circuit breaker):
        a 4xx other than 429 is about the request, not the upstream, "busy"
        is our own limit for it (its admission queue), and "internal" is an
        error of ours, not an upstream's."""
        return self.kind not in ("4xx", "busy", "internal")

    def retryable(self, retry_statuses: frozenset[int]) -> bool:
        """Safe and useful to send again before the first token ("auth":
        to another upstream only, with a key of its own)."""
        if self.kind in ("connect", "refused", "connection_lost", "reset", "timeout", "busy",
                         "auth"):
            return True
        return self.status is not None and self.status in retry_statuses


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, UpstreamStatusError):
        status = exc.upstream_status
        if status == 429:
            kind = "429"
        elif status >= 500:
            kind = "5xx"
        elif status in UPSTREAM_AUTH_STATUSES:
            kind = "auth"
        elif 400 <= status < 500:
            kind = "4xx"
        else:
            # A redirect or another answer that is no stream: the
            # upstream's (its address, say), whatever the request.
            kind = "other"
        return Failure(kind, status, parse_retry_after(exc.retry_after))
    if isinstance(exc, QueueFull | QueueTimeout):
        return Failure("busy")
    for cls, kind in (
        (UpstreamConnectError, "connect"),
        (UpstreamStreamRefused, "refused"),
        (UpstreamConnectionLost, "connection_lost"),
        (UpstreamStreamReset, "reset"),
        (UpstreamTimeout, "timeout"),
        (UpstreamProtocolError, "protocol"),
    ):
        if isinstance(exc, cls):
            return Failure(kind)
    if isinstance(exc, UpstreamError):
        return Failure("other")
    return Failure("internal")


def parse_retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = datetime.datetime.now(datetime.UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - now).total_seconds())
