"""The routing file (GATEWAY_CONFIG): ``[[upstream]]`` tables and ``[routing]``.

Parsed with the standard library's ``tomllib``, then checked field by field:
every error names the file, the line and the field (``upstream[1].weight``),
so ``python -m gateway`` can print it as one line and exit 2. Keys never
come from the file: ``api_key_env`` names the environment variable that
holds one, read here, once, at start.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.durations import MAX_DURATION_MS
from gateway.upstream.origin import ALLOWED as URL_ALLOWED
from gateway.upstream.origin import Origin
from gateway.upstream.transport import PROTOCOLS

FORMATS = ("openai", "anthropic")
#: The model name that matches every request.
ANY_MODEL = "*"

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UPSTREAM_FIELDS = frozenset({
    "name", "url", "format", "protocol", "api_key_env", "models", "priority", "weight",
    "model_map", "max_connections", "max_inflight", "first_token_timeout_ms",
})
_ROUTING_FIELDS = frozenset({
    "max_attempts", "retry_budget_ratio", "retry_budget_min", "max_retry_after_ms",
    "circuit_failures", "circuit_cooldown_ms",
})


class RoutingConfigError(ValueError):
    """A routing file that cannot be used; the message is the whole line."""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str
    format: str = "openai"
    protocol: str = "auto"
    api_key: str = field(default="", repr=False)
    #: The environment variable the key came from ("" when none).
    api_key_env: str = ""
    #: Client model names this upstream serves; ``("*",)`` serves any.
    models: tuple[str, ...] = (ANY_MODEL,)
    #: Lower first; equal priorities share the load by weight.
    priority: int = 0
    weight: float = 1.0
    #: Client model name -> the name sent upstream.
    model_map: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: HTTP/2 connections to this origin (None: UPSTREAM_MAX_CONNECTIONS).
    max_connections: int | None = None
    #: Streams open on this upstream at once (0: no limit of its own).
    max_inflight: int = 0
    #: One attempt's wait for its first token, before the next candidate is
    #: tried (None: the whole first-token deadline, UPSTREAM_FIRST_TOKEN_TIMEOUT_MS).
    first_token_timeout_ms: int | None = None

    def serves(self, model: str) -> bool:
        return ANY_MODEL in self.models or model in self.models

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def first_token_s(self, within_s: float | None) -> float | None:
        """How long one attempt here waits for its first token, in seconds:
        its own ``first_token_timeout_ms`` within ``within_s`` (None: no
        bound from outside)."""
        own = self.first_token_timeout_ms
        if own is None:
            return within_s
        return own / 1000 if within_s is None else min(within_s, own / 1000)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    #: Attempts per request before the first token, the first one included.
    max_attempts: int = 3
    #: Retries allowed on top of ``retry_budget_min`` per 10 s: this share of
    #: the requests of those 10 s (Finagle's RetryBudget, Envoy's budget).
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 10
    #: A 429's Retry-After longer than this is not waited for.
    max_retry_after_ms: int = 10_000
    #: Statuses that move a request to the next candidate (before its first
    #: token; 529 is Anthropic's "overloaded"). The one-upstream environment
    #: setup retries none: the client sees the upstream's status as it always did.
    retry_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504, 529})
    #: Consecutive failures that open an upstream's circuit.
    circuit_failures: int = 5
    circuit_cooldown_ms: int = 10_000


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    upstreams: tuple[UpstreamConfig, ...]
    retry: RetryConfig = RetryConfig()
    #: Whether model names were configured (a file): then an unknown model
    #: is a 404 model_not_found; the one-upstream environment setup serves any.
    from_file: bool = False

    def candidates(self, model: str) -> tuple[UpstreamConfig, ...]:
        return tuple(up for up in self.upstreams if up.serves(model))

    def listed_models(self) -> list[str]:
        """The model names configured by name, in file order, once each."""
        seen: dict[str, None] = {}
        for upstream in self.upstreams:
            for model in upstream.models:
                if model != ANY_MODEL:
                    seen.setdefault(model, None)
        return list(seen)


def load_routing(path: str, env: Mapping[str, str]) -> RoutingConfig:
    """Read and check the file at ``path``; raises ``RoutingConfigError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutingConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_routing(text, env, source=path)


def parse_routing(text: str, env: Mapping[str, str], *, source: str = "<config>") -> RoutingConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise RoutingConfigError(f"{source}: not valid TOML: {exc}") from exc
    lines = _KeyLines(text)
    where = _Where(source, lines)
    unknown = set(document) - {"upstream", "routing"}
    if unknown:
        key = sorted(unknown)[0]
        raise where.error(None, key, "unknown table or key (expected [[upstream]] and [routing])")
    raw_upstreams = document.get("upstream")
    if raw_upstreams is None:
        raise RoutingConfigError(f"{source}: no [[upstream]] table: at least one is needed")
    if not isinstance(raw_upstreams, list) or not raw_upstreams:
        raise where.error(None, "upstream", "must be [[upstream]] tables")
    upstreams = tuple(
        _upstream(index, table, env, where) for index, table in enumerate(raw_upstreams)
    )
    names = [up.name for up in upstreams]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise where.error(index, "name", f"{name!r} is used by another upstream")
    raw_routing = document.get("routing", {})
    if not isinstance(raw_routing, dict):
        raise where.error(None, "routing", "must be a table: [routing]")
    return RoutingConfig(upstreams, _retry(raw_routing, where), from_file=True)


def _upstream(index: int, table: Any, env: Mapping[str, str], where: _Where) -> UpstreamConfig:
    if not isinstance(table, dict):
        raise where.error(index, "upstream", "must be a table")
    for key in table:
        if key not in _UPSTREAM_FIELDS:
            raise where.error(index, key, "unknown field (allowed: "
                              + ", ".join(sorted(_UPSTREAM_FIELDS)) + ")")
    read = _Fields(table, index, where)
    name = read.text("name", required=True)
    if not _NAME.match(name):
        raise where.error(index, "name", "1-64 letters, digits, '.', '_' or '-'")
    url = read.text("url", required=True).rstrip("/")
    try:
        origin = Origin.parse(url)
    except ValueError:
        raise where.error(index, "url", URL_ALLOWED) from None
    protocol = read.choice("protocol", "auto", PROTOCOLS)
    if protocol == "h2c" and origin.is_tls:
        raise where.error(index, "protocol", "h2c is cleartext; use h2 for an https:// URL")
    key_env = read.text("api_key_env", required=False)
    api_key = ""
    if key_env:
        api_key = env.get(key_env, "").strip()
        if not api_key:
            raise where.error(index, "api_key_env", f"the environment has no {key_env} (or it is empty)")
    models = read.models()
    model_map = read.model_map()
    if ANY_MODEL not in models:
        # Requests for any other model never reach this table: the entry
        # would do nothing, and a typo of a served name would pass it unmapped.
        unserved = next((name for name in model_map if name not in models), None)
        if unserved is not None:
            raise where.error(
                index, "model_map", f"{unserved!r} is not one of its models", entry=unserved
            )
    return UpstreamConfig(
        name=name,
        url=url,
        format=read.choice("format", "openai", FORMATS),
        protocol=protocol,
        api_key=api_key,
        api_key_env=key_env or "",
        models=models,
        priority=read.integer("priority", 0, low=-1_000_000),
        weight=read.number("weight", 1.0),
        model_map=model_map,
        max_connections=read.optional_integer("max_connections", low=1),
        max_inflight=read.integer("max_inflight", 0, low=0),
        first_token_timeout_ms=read.optional_integer(
            "first_token_timeout_ms", low=1, high=MAX_DURATION_MS
        ),
    )


def _retry(table: dict[str, Any], where: _Where) -> RetryConfig:
    for key in table:
        if key not in _ROUTING_FIELDS:
            raise where.error(None, key, "unknown field in [routing] (allowed: "
                              + ", ".join(sorted(_ROUTING_FIELDS)) + ")")
    read = _Fields(table, None, where)
    default = RetryConfig()
    return RetryConfig(
        max_attempts=read.integer("max_attempts", default.max_attempts, low=1),
        retry_budget_ratio=read.number("retry_budget_ratio", default.retry_budget_ratio, low=0.0),
        retry_budget_min=read.integer("retry_budget_min", default.retry_budget_min, low=0),
        max_retry_after_ms=read.integer(
            "max_retry_after_ms", default.max_retry_after_ms, low=0, high=MAX_DURATION_MS
        ),
        circuit_failures=read.integer("circuit_failures", default.circuit_failures, low=1),
        circuit_cooldown_ms=read.integer(
            "circuit_cooldown_ms", default.circuit_cooldown_ms, low=1, high=MAX_DURATION_MS
        ),
    )


class _KeyLines:
    """Where each key of each ``[[upstream]]`` (and ``[routing]``) starts,
    and each entry of a table inside an ``[[upstream]]``, as
    ``model_map.<name>``: written as a ``[upstream.model_map]`` sub-table
    (which TOML gives to the last ``[[upstream]]`` above it), as dotted
    keys (``model_map."gpt-4o" = ...``) or inline (then the line of
    ``model_map``).

    tomllib reports lines for syntax errors only; a value that parses but is
    wrong (a negative weight) is found again here by a line scan of the
    same text. Good enough for the tables this file has: one key a line,
    one level of sub-table."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    _PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
    _KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
    _PARTS = re.compile(_PART)

    def __init__(self, text: str) -> None:
        self.tables: list[int] = []
        self.keys: dict[tuple[int | None, str], int] = {}
        table: int | None = None
        within = ""  # the sub-table of the current [[upstream]], if in one
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                brackets, name = header.groups()
                self.keys.setdefault((None, name), number)
                within = ""
                if name == "upstream" and brackets == "[[":
                    self.tables.append(number)
                    table = len(self.tables) - 1
                elif name.startswith("upstream.") and brackets == "[" and table is not None:
                    within = name.removeprefix("upstream.")
                    self.keys.setdefault((table, within), number)
                else:
                    table = None
                continue
            key = self._KEY.match(line)
            if key:
                path = [within] if within else []
                path += [part.strip("\"'") for part in self._PARTS.findall(key.group(1))]
                for depth in range(1, len(path) + 1):
                    self.keys.setdefault((table, ".".join(path[:depth])), number)

    def line(self, index: int | None, key: str) -> int | None:
        """The line of ``key`` (``model_map.<name>``: of that entry), else
        of the key or table that holds it, else of its ``[[upstream]]``."""
        while (found := self.keys.get((index, key))) is None and "." in key:
            key = key.rpartition(".")[0]
        if found is None and index is not None and index < len(self.tables):
            return self.tables[index]
        return found


@dataclass(frozen=True, slots=True)
class _Where:
    source: str
    lines: _KeyLines

    def error(
        self, index: int | None, key: str, problem: str, *, entry: str | None = None
    ) -> RoutingConfigError:
        """``entry``: the name within ``key`` (a table) at fault, whose line is given."""
        line = self.lines.line(index, key if entry is None else f"{key}.{entry}")
        at = f"line {line}: " if line is not None else ""
        name = f"upstream[{index}].{key}" if index is not None else key
        return RoutingConfigError(f"{self.source}: {at}{name}: {problem}")


class _Fields:
    """Typed reads of one table's fields, each failing with the field's line."""

    def __init__(self, table: dict[str, Any], index: int | None, where: _Where) -> None:
        self._table = table
        self._index = index
        self._where = where

    def _fail(self, key: str, problem: str) -> RoutingConfigError:
        return self._where.error(self._index, key, problem)

    def text(self, key: str, *, required: bool) -> str:
        value = self._table.get(key)
        if value is None:
            if required:
                raise self._fail(key, "missing (a string is required)")
            return ""
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, "must be a non-empty string")
        return value.strip()

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._table.get(key, default)
        if not isinstance(value, str) or value.lower() not in choices:
            raise self._fail(key, "must be one of " + ", ".join(choices))
        return value.lower()

    def integer(self, key: str, default: int, *, low: int, high: int | None = None) -> int:
        """``high``: for a duration, MAX_DURATION_MS, as in the environment."""
        value = self._table.get(key, default)
        # bool is an int in Python; in the file it is a mistake.
        if (
            isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)
        ):
            allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
            raise self._fail(key, f"must be {allowed}")
        return value

    def optional_integer(self, key: str, *, low: int, high: int | None = None) -> int | None:
        if key not in self._table:
            return None
        return self.integer(key, low, low=low, high=high)

    def number(self, key: str, default: float, *, low: float | None = None) -> float:
        value = self._table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "must be a number")
        number = float(value)
        if not math.isfinite(number):
            raise self._fail(key, "must be a finite number")
        if low is None and number <= 0:
            raise self._fail(key, "must be a number > 0")
        if low is not None and number < low:
            raise self._fail(key, f"must be a number >= {low:g}")
        return number

    def models(self) -> tuple[str, ...]:
        value = self._table.get("models", [ANY_MODEL])
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(m, str) and m.strip() for m in value)
        ):
            raise self._fail("models", 'must be a non-empty list of model names ("*": any)')
        return tuple(m.strip() for m in value)

    def model_map(self) -> dict[str, str]:
        value = self._table.get("model_map", {})
        problem = 'must be a table of names: { "client" = "upstream" }'
        if not isinstance(value, dict):
            raise self._fail("model_map", problem)
        for name, upstream in value.items():
            if not isinstance(upstream, str) or not upstream.strip():
                raise self._where.error(self._index, "model_map", problem, entry=name)
        return dict(value)
