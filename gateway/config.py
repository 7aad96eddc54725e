"""Settings from the environment (every variable: docs/configuration.md).

``Settings.from_env()`` reads every variable once at start; a bad value raises
``ConfigError`` naming the variable and what is allowed, which ``python -m
gateway`` prints as one line before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from gateway.durations import MAX_DURATION_MS, MAX_DURATION_S
from gateway.exchanges.store import parse_store_url
from gateway.routing.config import RoutingConfig, RoutingConfigError, load_routing
from gateway.upstream.origin import ALLOWED as URL_ALLOWED
from gateway.upstream.origin import Origin
from gateway.upstream.transport import PROTOCOLS

T = TypeVar("T")

FORMATS = ("openai", "anthropic")
SCOPES = ("key", "global")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: A client's key as it may be sent (``Authorization: Bearer`` or
#: ``x-api-key``): printable ASCII without spaces, a token68 (RFC 7235
#: section 2.1; RFC 6750's b64token).
CREDENTIAL = re.compile(r"[!-~]+")
#: JSON lines by default (what the journal and log shippers read); "auto":
#: console lines on a terminal, JSON lines otherwise (gateway/logs.py).
LOG_FORMATS = ("json", "console", "auto")


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
    #: HTTP/2 liveness, not read from the environment: a PING after this long
    #: without a frame from the upstream, and the connection (with its
    #: streams) counted lost when no frame follows within the timeout. A dead
    #: peer is found within 15 s, half the idle timeout.
    upstream_ping_interval_s: float = 10.0
    upstream_ping_timeout_s: float = 5.0
    #: Streams one HTTP/2 connection opens before a fresh one takes over
    #: (not read from the environment): below the 1,000 requests at which
    #: hypercorn and nginx end a connection.
    upstream_max_streams_per_connection: int = 500
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
    #: Peers whose X-Request-Id and X-Forwarded-For are believed. None by
    #: default: any local process could otherwise choose its request id.
    #: The deploy config lists the proxy (nginx on loopback).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    drain_timeout_s: float = 30.0
    #: Run on uvloop when it is installed; GATEWAY_UVLOOP=0 keeps asyncio's loop.
    uvloop: bool = True
    #: Chunk JSON with orjson when it is installed; GATEWAY_ORJSON=0 keeps the
    #: standard library (gateway/json_codec.py).
    orjson: bool = True
    #: While a stream waits for its first token, a ``: ping`` this often (0:
    #: off). A proxy learns that its client has gone only when a write to it
    #: fails, so this bounds how long an abandoned request keeps the
    #: upstream generating (gateway/sse.py, ``Keepalive``).
    first_token_ping_interval_ms: int = 150
    # -- several upstreams (GATEWAY_CONFIG; docs/routing.md) ----------------------------
    #: The routing file's upstreams; None: the one upstream of UPSTREAM_*.
    routing: RoutingConfig | None = None

    # -- client connections: deadlines and slow readers ----------------------
    # (each beside nginx's equivalent; docs in README, "Client deadlines")
    #: A kept-alive connection with no request for this long is closed
    #: (nginx keepalive_timeout, 75 s).
    client_idle_timeout_s: float = 75.0
    #: From a request's first byte to its complete head (nginx
    #: client_header_timeout, 60 s): a slowloris client is closed.
    client_header_timeout_s: float = 60.0
    #: From the head to the complete body (nginx client_body_timeout, 60 s,
    #: though nginx's is between two reads): 408, connection closed.
    client_body_timeout_s: float = 60.0
    #: How far a stream's reader may fall behind the newest delta, in bytes
    #: of the answer, before it is ended with ``slow_reader``. Like Redis's
    #: client-output-buffer-limit: the others never wait for it.
    stream_max_lag_bytes: int = 4 * 1_048_576
    #: How long a reader behind the newest delta may go without taking any,
    #: with the same end.
    stream_max_lag_s: float = 30.0
    # -- the exchange log ------------------------------------------------------
    #: ``sqlite:///path.db`` or ``postgresql://user@host:port/db``; None: off.
    #: Not in repr: a PostgreSQL URL may carry a password.
    exchange_log_url: str | None = field(default=None, repr=False)
    #: Store message text (else roles, lengths and SHA-256 only).
    exchange_log_content: bool = False
    #: Exchanges that may wait for the database before new ones are dropped.
    exchange_log_queue: int = 10_000
    #: And their size, roughly, in bytes: with content on each holds its
    #: whole prompt and answer.
    exchange_log_queue_bytes: int = 64 * 1_048_576
    #: Keys that may read /v1/exchanges when auth is on.
    gateway_admin_keys: tuple[str, ...] = field(default=(), repr=False)
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
            upstream_connect_timeout_ms=read.milliseconds("UPSTREAM_CONNECT_TIMEOUT_MS", 5000, low=1),
            upstream_first_token_timeout_ms=read.milliseconds(
                "UPSTREAM_FIRST_TOKEN_TIMEOUT_MS", 60000, low=1
            ),
            upstream_idle_timeout_ms=read.milliseconds("UPSTREAM_IDLE_TIMEOUT_MS", 30000, low=1),
            coalesce_enabled=read.flag("COALESCE_ENABLED", True),
            stream_fanout_enabled=read.flag("STREAM_FANOUT_ENABLED", True),
            coalesce_scope=read.choice("COALESCE_SCOPE", "key", SCOPES),
            error_ttl_ms=read.milliseconds("ERROR_TTL_MS", 2000, low=0),
            max_replay_bytes=read.integer("MAX_REPLAY_BYTES", 1_048_576, low=1024),
            max_inflight=read.integer("MAX_INFLIGHT", 256, low=1),
            max_queue=read.integer("MAX_QUEUE", 1024, low=0),
            queue_timeout_ms=read.milliseconds("QUEUE_TIMEOUT_MS", 10000, low=1),
            ping_interval_s=read.seconds("PING_INTERVAL_S", 15.0, low=0.01),
            gateway_api_keys=read.keys("GATEWAY_API_KEYS"),
            max_body_bytes=read.integer("MAX_BODY_BYTES", 1_048_576, low=1024),
            log_level=read.choice("LOG_LEVEL", "info", LOG_LEVELS),
            log_format=read.choice("LOG_FORMAT", "json", LOG_FORMATS),
            trusted_proxies=read.networks("TRUSTED_PROXIES", ""),
            drain_timeout_s=read.seconds("DRAIN_TIMEOUT_S", 30.0, low=0.0),
            uvloop=read.flag("GATEWAY_UVLOOP", True),
            orjson=read.flag("GATEWAY_ORJSON", True),
            first_token_ping_interval_ms=read.milliseconds("FIRST_TOKEN_PING_INTERVAL_MS", 150, low=0),
            # -- client connections --
            client_idle_timeout_s=read.seconds("CLIENT_IDLE_TIMEOUT_S", 75.0, low=0.1),
            client_header_timeout_s=read.seconds("CLIENT_HEADER_TIMEOUT_S", 60.0, low=0.1),
            client_body_timeout_s=read.seconds("CLIENT_BODY_TIMEOUT_S", 60.0, low=0.1),
            stream_max_lag_bytes=read.integer("STREAM_MAX_LAG_BYTES", 4 * 1_048_576, low=1024),
            stream_max_lag_s=read.seconds("STREAM_MAX_LAG_S", 30.0, low=0.1),
            exchange_log_url=read.store_url("EXCHANGE_LOG_URL"),
            exchange_log_content=read.flag("EXCHANGE_LOG_CONTENT", False),
            exchange_log_queue=read.integer("EXCHANGE_LOG_QUEUE", 10_000, low=1),
            exchange_log_queue_bytes=read.integer(
                "EXCHANGE_LOG_QUEUE_BYTES", 64 * 1_048_576, low=1_048_576
            ),
            gateway_admin_keys=read.keys("GATEWAY_ADMIN_KEYS"),
            redis_url=read.redis_url("REDIS_URL"),
            workers=read.integer("GATEWAY_WORKERS", 1, low=1, high=256),
            cluster_advertise_url=read.advertise_url("CLUSTER_ADVERTISE_URL"),
            cluster_secret=read.header_secret("CLUSTER_SECRET"),
            cluster_lease_ms=read.milliseconds("CLUSTER_LEASE_MS", 10000, low=1000),
            cluster_redis_timeout_ms=read.milliseconds("CLUSTER_REDIS_TIMEOUT_MS", 250, low=1),
        )
        if settings.workers > 1 and settings.redis_url is None:
            raise ConfigError(
                "GATEWAY_WORKERS",
                "more than 1 worker needs REDIS_URL (workers share one coalescing namespace)",
                str(settings.workers),
            )
        advertised_port = urlsplit(settings.cluster_advertise_url or "").port
        if advertised_port is not None and advertised_port + settings.workers - 1 > 65535:
            # Worker i binds PORT+i; past 65535 the socket layer takes it
            # modulo 65536 (port 0: a random port, advertised to nobody).
            raise ConfigError(
                "CLUSTER_ADVERTISE_URL",
                f"worker i binds PORT+i: with {settings.workers} workers, PORT at most "
                f"{65536 - settings.workers}",
                str(settings.cluster_advertise_url),
            )
        if settings.cluster_advertise_url is not None and not settings.cluster_secret:
            host = urlsplit(settings.cluster_advertise_url).hostname or ""
            if not _is_local(host):
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
        return _with_routing_file(settings, env)


#: What each [[upstream]] of a routing file says for itself.
_REPLACED_BY_THE_FILE = {
    "UPSTREAM_API_KEY": "api_key_env", "UPSTREAM_FORMAT": "format", "UPSTREAM_PROTOCOL": "protocol",
}


def _with_routing_file(settings: Settings, env: Mapping[str, str]) -> Settings:
    """GATEWAY_CONFIG names the upstreams; UPSTREAM_URL then has no place
    (which upstream would it be?), nor what each table says for itself (its
    key, format and protocol): set, they would be ignored. The other
    UPSTREAM_* values (timeouts, connections) stay the defaults of every
    upstream in the file."""
    path = env.get("GATEWAY_CONFIG", "").strip()
    if not path:
        return settings
    if settings.upstream_url is not None:
        raise ConfigError(
            "UPSTREAM_URL", "unset it when GATEWAY_CONFIG names the upstreams", "(set)"
        )
    try:
        routing = load_routing(path, env)
    except RoutingConfigError as exc:
        raise FileConfigError("GATEWAY_CONFIG", str(exc)) from exc
    # A table may name UPSTREAM_API_KEY as its api_key_env: then it is used.
    named = {upstream.api_key_env for upstream in routing.upstreams}
    for variable, field_name in _REPLACED_BY_THE_FILE.items():
        if env.get(variable, "").strip() and variable not in named:
            raise ConfigError(
                variable,
                f"unset it when GATEWAY_CONFIG names the upstreams (each [[upstream]] "
                f"has its own {field_name})",
                "(set)",
            )
    return dataclasses.replace(settings, routing=routing)


class FileConfigError(ConfigError):
    """A bad GATEWAY_CONFIG file: the message names the file, line and field."""

    def __init__(self, variable: str, message: str) -> None:
        ValueError.__init__(self, f"{variable}: {message}")
        self.variable = variable


def cluster_listen_host(host: str, advertise_url: str | None) -> str:
    """Where cluster mode's internal hop listens. It serves any stream by
    its key: members on this host only (no advertised address, or a loopback
    one) reach it over loopback, whatever GATEWAY_HOST is; members on
    several hosts (an advertised address they can reach, and CLUSTER_SECRET)
    on GATEWAY_HOST."""
    advertised = None if advertise_url is None else urlsplit(advertise_url).hostname
    if advertised is not None and not _is_local(advertised):
        return host
    if advertised == "localhost":
        return advertised
    v6 = advertised == "::1" or (advertised is None and ":" in host)
    return "::1" if v6 else "127.0.0.1"


def _is_local(host: str) -> bool:
    return host == "localhost" or _is_loopback(host)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The user:password@ of a URL, however malformed the rest.
_USERINFO = re.compile(r"^([^:/?#]*://)[^/?#]*@")


#: A URL's query or fragment, and all that follows.
_QUERY_OR_FRAGMENT = re.compile(r"([?#]).*", re.DOTALL)


def _without_secrets(url: str) -> str:
    """``url`` fit for an error line: its user and password may be a
    secret, and so may its query (``?key=``) or fragment (``#token=``)."""
    url = _USERINFO.sub(r"\1[redacted]@", url)
    return _QUERY_OR_FRAGMENT.sub(r"\1[redacted]", url, count=1)


class _Reader:
    """Typed reads of the environment, each failing with a ConfigError."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _get(
        self, name: str, default: T, parse: Callable[[str], T], allowed: str,
        shown: Callable[[str], str] = str,
    ) -> T:
        raw = self._env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(name, allowed, shown(raw)) from exc

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

    def milliseconds(self, name: str, default: int, *, low: int) -> int:
        """A duration in whole milliseconds, at most a day."""
        return self.integer(name, default, low=low, high=MAX_DURATION_MS)

    def seconds(self, name: str, default: float, *, low: float) -> float:
        """A duration in seconds, at most a day: ``inf`` and ``nan`` too are refused."""
        def parse(raw: str) -> float:
            value = float(raw)
            if not low <= value <= MAX_DURATION_S:  # also rejects NaN
                raise ValueError(raw)
            return value

        return self._get(
            name, default, parse, f"a number of seconds >= {low:g} and <= {MAX_DURATION_S:g}"
        )

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

        return self._get(
            name, None, parse, URL_ALLOWED, shown=_without_secrets
        )

    def store_url(self, name: str) -> str | None:
        raw = (self._env.get(name) or "").strip()
        if not raw:
            return None
        try:
            parse_store_url(raw)
        except ValueError as exc:
            # Not echoed: a PostgreSQL URL may carry a password.
            raise ConfigError(
                name, "sqlite:///path/to/file.db or postgresql://user@host:port/db", "(hidden)"
            ) from exc
        return raw

    def redis_url(self, name: str) -> str | None:
        raw = (self._env.get(name) or "").strip()
        if not raw:
            return None
        scheme, sep, rest = raw.partition("://")
        allowed = "a redis://, rediss:// or unix:// URL"
        if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
            # Not echoed: the value may carry a password.
            raise ConfigError(name, allowed, "(hidden)")
        # redis-py's own reading of the URL (port, db, query options), done
        # now so that a bad one stops the start rather than every claim.
        from gateway.cluster.directory import check_url

        try:
            check_url(raw)
        except ValueError as exc:
            # redis-py's words and check_url's name an option, never a value.
            raise ConfigError(name, f"{allowed} ({exc})", "(hidden)") from exc
        return raw

    def advertise_url(self, name: str) -> str | None:
        def parse(raw: str) -> str:
            scheme, sep, rest = raw.partition("://")
            host, _, path = rest.partition("/")
            # Members reach the internal listener at its own paths: a path,
            # query or fragment here would be dropped.
            if scheme != "http" or not sep or not host or path or any(c in host for c in "@?#"):
                raise ValueError(raw)
            parts = urlsplit(f"http://{host}")
            # ValueError when it is not a number, or out of range; 0 is no
            # address (and worker i would bind port i).
            if not parts.hostname or parts.port == 0:
                raise ValueError(raw)
            return f"http://{host}"

        return self._get(
            name, None, parse, "http://HOST or http://HOST:PORT (PORT 1-65535; no path)",
            shown=_without_secrets,
        )

    def header_secret(self, name: str) -> str:
        """A secret sent in a request header: what a header value may hold
        (RFC 9110 section 5.5: no control character but a tab). aiohttp
        refuses to send any other, so every request that carries it would
        fail."""
        raw = self._env.get(name, "").strip()
        if any((char < " " and char != "\t") or char == "\x7f" for char in raw):
            # Not echoed: the value is a secret.
            raise ConfigError(
                name, "text without control characters (it is sent in a header)", "(hidden)"
            )
        return raw

    def keys(self, name: str) -> tuple[str, ...]:
        """Client keys: each one a client can send (``CREDENTIAL``); any
        other could never match, and every request would be a 401."""
        raw = self._env.get(name, "")
        keys = tuple(key.strip() for key in raw.split(",") if key.strip())
        if not all(CREDENTIAL.fullmatch(key) for key in keys):
            # Not echoed: the value is a list of secrets.
            raise ConfigError(
                name,
                "comma-separated keys, each printable ASCII without spaces (what a client can send)",
                "(hidden)",
            )
        return keys

    def networks(
        self, name: str, default: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        def parse(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
            return tuple(ipaddress.ip_network(p.strip()) for p in raw.split(",") if p.strip())

        return self._get(name, parse(default), parse, "comma-separated IP networks (CIDR)")
