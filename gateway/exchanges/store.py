"""What the writer and the API need from a database, and how a URL picks one.

Errors by cause: ``StoreUnavailable`` means the database could not be
reached or is not answering (the writer keeps the batch and tries again);
``StoreRejected`` means it refused these rows (the writer drops the batch:
sending it again would fail again); ``StoreMisconfigured`` means the URL
itself is one the database client refuses (no attempt can succeed: the
start stops).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.exchanges.record import Exchange
from gateway.exchanges.schema import latest

__all__ = ["ExchangeStore", "StoreError", "StoreMisconfigured", "StoreRejected",
           "StoreUnavailable", "check_version",
           "open_store", "parse_store_url", "postgres_pool_options", "sqlite_path"]

#: Column order of an exchange row, shared by both stores.
COLUMNS = (
    "id", "created", "model", "upstream", "process", "outcome", "finish_reason", "error",
    "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms", "subscribers",
    "request_ids", "api_key_ids", "messages", "resolved_model",
)
MAX_LIMIT = 1000


class StoreError(Exception):
    """Base of the exchange store's errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, or did not answer in time."""


class StoreRejected(StoreError):
    """The database refused the rows themselves."""


class StoreMisconfigured(StoreError):
    """The URL, or one of its options, is not one the database client can
    use: found before any connection is tried, so no retry can help. The
    message names the option, never the URL's credentials."""


class ExchangeStore(Protocol):
    #: Where the log goes, fit for a log line (no credentials).
    description: str

    async def connect(self) -> None:
        """Connect, and create or migrate the schema if it is not current
        (a reader only checks it); raises StoreUnavailable, or
        StoreMisconfigured for a URL no attempt can use."""
        ...

    async def write(self, batch: Sequence[Exchange]) -> None:
        """Every exchange of ``batch``, or none of them. An exchange whose id
        is stored already is left as it is: after a ``StoreUnavailable`` the
        writer sends the batch again, and the failed call may have committed."""
        ...

    async def recent(
        self, *, limit: int, before: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, in the API's shape; ``before`` an exchange id."""
        ...

    async def aclose(self) -> None: ...


def check_version(description: str, version: int,
                  migrations: Sequence[tuple[int, tuple[str, ...]]]) -> None:
    """For a reader, which changes no schema: StoreUnavailable, saying why,
    unless the schema is the one this code reads."""
    if version == 0:
        raise StoreUnavailable(f"{description}: no exchange log there (no table "
                               "exchange_log_migrations); a gateway creates it at its first start")
    wanted = latest(migrations)
    if version != wanted:
        raise StoreUnavailable(f"{description}: the exchange log's schema is version {version}, "
                               f"this code reads version {wanted}")


def sqlite_path(url: str) -> str:
    """``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db``.
    Not ``:memory:``: SQLite gives each connection (the writer's, the
    reader's) a database of its own, so nothing written could be read."""
    path = url[len("sqlite:///"):]
    if not url.startswith("sqlite:///") or not path or path.endswith("/") or path == ":memory:":
        raise ValueError(url)
    return path


def postgres_pool_options(url: str) -> tuple[str, dict[str, int]]:
    """The URL for asyncpg, and the pool's own options taken out of its
    query: ``statement_cache_size`` (0 behind PgBouncer in transaction
    mode). asyncpg sends a query option it does not know to the server as
    a run-time setting, which PostgreSQL refuses at connect. ValueError for
    a value that is not a whole number >= 0."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, int] = {}
    kept = []
    for name, value in query:
        if name != "statement_cache_size":
            kept.append((name, value))
        elif value.isdigit():
            options[name] = int(value)
        else:
            raise ValueError(f"statement_cache_size={value!r}: not a whole number >= 0")
    if not options:
        return url, options  # as written: nothing of the pool's in it
    return urlunsplit(parts._replace(query=urlencode(kept))), options


def parse_store_url(url: str) -> str:
    """The URL's scheme ("sqlite" or "postgresql"); ValueError for anything else."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        sqlite_path(url)
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        if not parts.hostname and "host=" not in url:
            raise ValueError(url)
        _ = parts.port  # ValueError when it is not a number, or out of range
        postgres_pool_options(url)
        return "postgresql"
    raise ValueError(url)


def open_store(url: str, *, read_only: bool = False) -> ExchangeStore:
    """The store for ``url``, not yet connected. ``read_only``: to read an
    existing log, never creating or migrating anything. asyncpg is
    imported only for a PostgreSQL URL."""
    if parse_store_url(url) == "sqlite":
        from gateway.exchanges.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url), read_only=read_only)
    from gateway.exchanges.postgres import PostgresStore

    return PostgresStore(url, read_only=read_only)
