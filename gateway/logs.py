"""structlog set-up: JSON lines (or a console renderer), request ids through
contextvars, and a processor that keeps secrets out of every line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from gateway.redact import SECRETS

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

#: Field names whose values are never logged, whatever a caller passes.
_SECRET_FIELDS = frozenset({"authorization", "api_key", "x-api-key", "upstream_api_key", "token"})
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        value = event[name]
        if name.lower() in _SECRET_FIELDS:
            event[name] = "[redacted]"
        elif isinstance(value, str):
            # Every configured secret (gateway/redact.py), wherever it is quoted.
            value = SECRETS.redact(value)
            if "earer" in value:
                value = _BEARER.sub(r"\1[redacted]", value)
            event[name] = value
    return event


def resolve_format(fmt: str) -> str:
    """LOG_FORMAT=auto: console lines for a person at a terminal, JSON lines
    for everything else (the journal, a file, a log shipper)."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if resolve_format(fmt) == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,  # after format_exc_info: exception text is redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
