"""Settings from the environment (names fixed by ARCHITECTURE.md).

``Settings.from_env()`` reads every variable once at start; a bad value raises
``ConfigError`` naming the variable and what is allowed, which ``python -m
gateway`` prints as one line before exiting with status 2.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from gateway.upstream.origin import Origin
from gateway.upstream.transport import PROTOCOLS

T = TypeVar("T")

FORMATS = ("openai", "anthropic")
SCOPES = ("key", "global")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


class ConfigError(ValueError):
    def __init__(self, variable: str, allowed: str, value: str) -> None:
        super().__init__(f"{variable}={value!r} is not valid: {allowed}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: None: the built-in simulator, started in-process (the embedded default).
    upstream_url: str | None = None
    upstream_format: str = "openai"
    upstream_protocol: str = "auto"
    upstream_api_key: str = field(default="", repr=False)
    upstream_max_connections: int = 4
    upstream_connect_timeout_ms: int = 5000
    upstream_first_token_timeout_ms: int = 60000
    upstream_idle_timeout_ms: int = 30000
    coalesce_enabled: bool = True
    stream_fanout_enabled: bool = True
    coalesce_scope: str = "key"
    error_ttl_ms: int = 2000
    max_replay_bytes: int = 1_048_576
    max_inflight: int = 256
    max_queue: int = 1024
    queue_timeout_ms: int = 10000
    ping_interval_s: float = 15.0
    gateway_api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 1_048_576
    log_level: str = "info"
    log_format: str = "json"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    drain_timeout_s: float = 30.0
    #: Run on uvloop when it is installed; GATEWAY_UVLOOP=0 keeps asyncio's loop.
    uvloop: bool = True
    #: Chunk JSON with orjson when it is installed; GATEWAY_ORJSON=0 keeps the
    #: standard library (gateway/json_codec.py).
    orjson: bool = True
    # -- cluster mode (docs/cluster.md) --
    #: None: one process, no Redis. Set: every process on this Redis shares
    #: one coalescing namespace. May hold a password: never logged whole.
    redis_url: str | None = field(default=None, repr=False)
    #: Worker processes sharing the listening port (> 1 needs redis_url).
    workers: int = 1
    #: Which worker this process is (0-based), given by the supervisor that
    #: ``GATEWAY_WORKERS`` starts (gateway/workers.py), not by the operator;
    #: None in a process started on its own.
    worker_index: int | None = None
    #: How other members reach this one; None: the internal listener, on host.
    cluster_advertise_url: str | None = None
    cluster_secret: str = field(default="", repr=False)
    cluster_lease_ms: int = 10000
    #: The longest a request waits on Redis before it is served locally.
    cluster_redis_timeout_ms: int = 250

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        read = _Reader(env)
        settings = cls(
            host=read.text("GATEWAY_HOST", "127.0.0.1"),
            port=read.integer("GATEWAY_PORT", 8080, low=0, high=65535),
            upstream_url=read.url("UPSTREAM_URL"),
            upstream_format=read.choice("UPSTREAM_FORMAT", "openai", FORMATS),
            upstream_protocol=read.choice("UPSTREAM_PROTOCOL", "auto", PROTOCOLS),
            upstream_api_key=read.text("UPSTREAM_API_KEY", ""),
            upstream_max_connections=read.integer("UPSTREAM_MAX_CONNECTIONS", 4, low=1),
            upstream_connect_timeout_ms=read.integer("UPSTREAM_CONNECT_TIMEOUT_MS", 5000, low=1),
            upstream_first_token_timeout_ms=read.integer(
                "UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", 60000, low=1
            ),
            upstream_idle_timeout_ms=read.integer("UPSTREAM_IDLE_TIMEOUT_MS", 30000, low=1),
            coalesce_enabled=read.flag("COALESCE_ENABLED", True),
            stream_fanout_enabled=read.flag("STREAM_FANOUT_ENABLED", True),
            coalesce_scope=read.choice("COALESCE_SCOPE", "key", SCOPES),
            error_ttl_ms=read.integer("ERROR_TTL_MS", 2000, low=0),
            max_replay_bytes=read.integer("MAX_REPLAY_BYTES", 1_048_576, low=1024),
            max_inflight=read.integer("MAX_INFLIGHT", 256, low=1),
            max_queue=read.integer("MAX_QUEUE", 1024, low=0),
            queue_timeout_ms=read.integer("QUEUE_TIMEOUT_MS", 10000, low=1),
            ping_interval_s=read.number("PING_INTERVAL_S", 15.0, low=0.01),
            gateway_api_keys=read.keys("GATEWAY_API_KEYS"),
            max_body_bytes=read.integer("MAX_BODY_BYTES", 1_048_576, low=1024),
            log_level=read.choice("LOG_LEVEL", "info", LOG_LEVELS),
            log_format=read.choice("LOG_FORMAT", "json", LOG_FORMATS),
            trusted_proxies=read.networks("TRUSTED_PROXIES", "127.0.0.0/8,::1/128"),
            drain_timeout_s=read.number("DRAIN_TIMEOUT_S", 30.0, low=0.0),
            uvloop=read.flag("GATEWAY_UVLOOP", True),
            orjson=read.flag("GATEWAY_ORJSON", True),
            redis_url=read.redis_url("REDIS_URL"),
            workers=read.integer("GATEWAY_WORKERS", 1, low=1, high=256),
            cluster_advertise_url=read.advertise_url("CLUSTER_ADVERTISE_URL"),
            cluster_secret=read.text("CLUSTER_SECRET", ""),
            cluster_lease_ms=read.integer("CLUSTER_LEASE_MS", 10000, low=1000),
            cluster_redis_timeout_ms=read.integer("CLUSTER_REDIS_TIMEOUT_MS", 250, low=1),
        )
        if settings.workers > 1 and settings.redis_url is None:
            raise ConfigError(
                "GATEWAY_WORKERS",
                "more than 1 worker needs REDIS_URL (workers share one coalescing namespace)",
                str(settings.workers),
            )
        if settings.cluster_advertise_url is not None and not settings.cluster_secret:
            host = urlsplit(settings.cluster_advertise_url).hostname or ""
            if host != "localhost" and not _is_loopback(host):
                raise ConfigError(
                    "CLUSTER_SECRET",
                    "required when CLUSTER_ADVERTISE_URL is reachable from other hosts",
                    "",
                )
        if settings.upstream_protocol == "h2c" and (settings.upstream_url or "").startswith(
            "https:"
        ):
            raise ConfigError(
                "UPSTREAM_PROTOCOL", "h2c is cleartext; use h2 for an https:// URL", "h2c"
            )
        return settings


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Typed reads of the environment, each failing with a ConfigError."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _get(self, name: str, default: T, parse: Callable[[str], T], allowed: str) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(name, allowed, raw) from exc

    def text(self, name: str, default: str) -> str:
        return self._get(name, default, str, "any text")

    def integer(self, name: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")

        def parse(raw: str) -> int:
            value = int(raw)
            if value < low or (high is not None and value > high):
                raise ValueError(raw)
            return value

        return self._get(name, default, parse, allowed)

    def number(self, name: str, default: float, *, low: float) -> float:
        def parse(raw: str) -> float:
            value = float(raw)
            if not value >= low:  # also rejects NaN
                raise ValueError(raw)
            return value

        return self._get(name, default, parse, f"a number >= {low:g}")

    def flag(self, name: str, default: bool) -> bool:
        values = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}

        def parse(raw: str) -> bool:
            if raw.lower() not in values:
                raise ValueError(raw)
            return values[raw.lower()]

        return self._get(name, default, parse, "1 or 0 (also true/false, yes/no)")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(raw: str) -> str:
            if raw.lower() not in choices:
                raise ValueError(raw)
            return raw.lower()

        return self._get(name, default, parse, "one of " + ", ".join(choices))

    def url(self, name: str) -> str | None:
        def parse(raw: str) -> str:
            Origin.parse(raw)
            return raw.rstrip("/")

        return self._get(name, None, parse, "an http:// or https:// URL including /v1")

    def redis_url(self, name: str) -> str | None:
        raw = (self._env.get(name) or "").strip()
        if not raw:
            return None
        scheme, sep, rest = raw.partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
            # Not echoed: the value may carry a password.
            raise ConfigError(name, "a redis://, rediss:// or unix:// URL", "(hidden)")
        return raw

    def advertise_url(self, name: str) -> str | None:
        def parse(raw: str) -> str:
            scheme, sep, rest = raw.partition("://")
            host = rest.split("/", 1)[0]
            if scheme != "http" or not sep or not host or "@" in host:
                raise ValueError(raw)
            return f"http://{host}"

        return self._get(name, None, parse, "http://HOST or http://HOST:PORT")

    def keys(self, name: str) -> tuple[str, ...]:
        raw = self._env.get(name, "")
        return tuple(key.strip() for key in raw.split(",") if key.strip())

    def networks(
        self, name: str, default: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        def parse(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
            return tuple(ipaddress.ip_network(p.strip()) for p in raw.split(",") if p.strip())

        return self._get(name, parse(default), parse, "comma-separated IP networks (CIDR)")
