"""structlog set-up: JSON lines (or a console renderer), request ids through
contextvars, and a processor that keeps secrets out of every line.

Every request writes one line, so a line must cost microseconds: the JSON is
orjson's when the gateway's JSON is (``gateway.json_codec``; compact, the
standard library's output otherwise), and the secret check looks each field
name up once per process.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import re
import select
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from gateway import json_codec
from gateway.redact import SECRETS

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

#: Field names whose values are never logged, whatever a caller passes.
_SECRET_FIELDS = frozenset({"authorization", "api_key", "x-api-key", "upstream_api_key", "token"})
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
#: A credential header as a line quotes it ("x-api-key: sk-...", "Authorization:
#: Basic dXNl..."; the HTTP parser's error quotes the line it refused): the
#: value after the name, and after the auth scheme (RFC 9110 section 11.4).
_CREDENTIAL_HEADER = re.compile(
    r"(?i)(x-api-key\s*:\s*|(?:proxy-)?authorization\s*:\s*(?:[a-z]+\s+)?)[^\s\"',]+"
)


@functools.lru_cache(maxsize=256)
def _secret_names(names: tuple[str, ...]) -> frozenset[str]:
    """The fields of a line whose values are never logged: decided once per
    set of field names (a call site logs the same names every time)."""
    return frozenset(name for name in names if name.lower() in _SECRET_FIELDS)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    secret = _secret_names(tuple(event))
    for name, value in event.items():
        if name in secret:
            event[name] = "[redacted]"
        elif isinstance(value, str | Mapping | list | tuple):
            event[name] = _redacted(value)
    return event


def _names_a_credential_header(text: str) -> bool:
    """A cheap test before the pattern (a tenth of its cost): most text
    with a colon is a timestamp or an address."""
    lowered = text.lower()
    return "authorization" in lowered or "x-api-key" in lowered


def _redacted(value: Any) -> Any:
    """Every configured secret (gateway/redact.py) out of a value, wherever
    it is quoted, also inside the mappings and lists a field may hold."""
    if isinstance(value, str):
        value = SECRETS.redact(value)
        if "earer" in value:
            value = _BEARER.sub(r"\1[redacted]", value)
        if ":" in value and _names_a_credential_header(value):
            value = _CREDENTIAL_HEADER.sub(r"\1[redacted]", value)
        return value
    if isinstance(value, Mapping):
        return {
            key: "[redacted]" if str(key).lower() in _SECRET_FIELDS else _redacted(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return value


def _escaped_for_a_terminal(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Console lines are read on a terminal, and some values come from
    clients (a request path "/%1b[2J" decodes to an escape sequence): every
    control or format character but a newline or tab is written as its
    escape, so none can move the cursor, erase or recolour what is shown.
    (The renderer quotes a value holding a newline or tab as its repr.)"""
    for name, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            event[name] = "".join(
                c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode()
                for c in value
            )
    return event


def resolve_format(fmt: str) -> str:
    """LOG_FORMAT=auto: console lines for a person at a terminal, JSON lines
    for everything else (the journal, a file, a log shipper)."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


class _UTCTimestamp:
    """``timestamp``: ISO 8601 in UTC with microseconds, as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it, without a datetime per
    line (5 µs of a line's ~10): the date and the time of day are formatted
    once a second."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def say(line: str, *, file: TextIO | None = None) -> None:
    """``line`` and its newline in one write, flushed (stdout by default).
    A supervisor and its workers share stdout and stderr, and a write of at
    most PIPE_BUF bytes to a pipe is never split; ``print`` writes the text
    and the newline apart, so two processes' lines could splice."""
    stream = sys.stdout if file is None else file
    stream.write(line + "\n")
    stream.flush()


class _Stamp:
    """A processor that adds one fixed field to every line."""

    __slots__ = ("_name", "_value")

    def __init__(self, name: str, value: object) -> None:
        self._name, self._value = name, value

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault(self._name, self._value)
        return event


class TickWriter:
    """structlog's logger: the lines logged in one event-loop iteration leave
    in one write (or a few of at most PIPE_BUF bytes each), at its end (a
    write to a pipe, as stderr is under a supervisor, also wakes the reader:
    that, not the formatting, was most of a request line's cost). Outside a
    running loop each line is written at once, after any still pending; and
    whatever is pending at exit is written."""

    __slots__ = ("_file", "_pending", "_flush_on")

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        #: The loop whose next iteration writes what is pending.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def msg(self, message: str) -> None:
        self._pending.append(message)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    log = debug = info = warning = warn = error = err = critical = fatal = exception = failure = msg

    def flush(self) -> None:
        self._flush_on = None
        if self._pending:
            lines, self._pending = self._pending, []
            for chunk in _atomic_chunks(lines):
                self._file.write(chunk)
                self._file.flush()


def _atomic_chunks(lines: list[str]) -> Iterator[str]:
    """``lines`` as few texts of whole lines, each at most PIPE_BUF bytes
    (a line longer than that alone): a write of at most PIPE_BUF bytes to a
    pipe is atomic, so the lines of workers sharing one stderr pipe are
    never spliced into each other when its reader falls behind."""
    text = "\n".join(lines) + "\n"
    if len(text) * 4 <= select.PIPE_BUF or len(text.encode()) <= select.PIPE_BUF:
        yield text  # the common case: one write
        return
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode()) + 1
        if chunk and size + length > select.PIPE_BUF:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "\n".join(chunk) + "\n"


def _json_serializer() -> Callable[..., str]:
    """``json.dumps`` for structlog's renderer: orjson's when the gateway's
    JSON is, the standard library deciding what orjson refuses (keys that are
    not strings, integers beyond 64 bits)."""
    if json_codec.BACKEND != "orjson":
        return json.dumps
    import orjson

    orjson_dumps, encode_error = orjson.dumps, orjson.JSONEncodeError

    def dumps(event: Any, default: Callable[[Any], Any]) -> str:
        try:
            return orjson_dumps(event, default=default).decode()
        except encode_error:
            return json.dumps(event, default=default)

    return dumps


#: Where the lines go; what it holds at exit is written then.
_writer = TickWriter(sys.stderr)
atexit.register(lambda: _writer.flush())


def configure_logging(level: str = "info", fmt: str = "json", *, worker: int | None = None) -> None:
    """``worker``: a supervised worker's index, stamped on every line (the
    workers share the supervisor's stderr, and the journal's pid)."""
    console = resolve_format(fmt) == "console"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer(_json_serializer())
    )
    global _writer
    _writer.flush()
    writer = _writer = TickWriter(sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _UTCTimestamp(),
            structlog.processors.format_exc_info,
            _redact,  # after format_exc_info: exception text is redacted too
            *([] if worker is None else [_Stamp("worker", worker)]),
            *([_escaped_for_a_terminal] if console else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
