"""The fleet's store: PostgreSQL through an asyncpg pool.

A batch is one ``executemany`` in one transaction. Every call is bounded in
time (``COMMAND_TIMEOUT_S``), so a hung server is a ``StoreUnavailable``
after a few seconds, never a writer stuck for good; such a commit may have
gone through all the same, and the writer's next attempt finds its rows
there (the insert skips an id already stored). When the server goes
away the pool's broken connections fail once and are replaced on the next
attempt: writing resumes by itself when it is back. Behind PgBouncer in
transaction mode asyncpg's statement cache must be off: set
``statement_cache_size=0`` in the URL's query (the pool takes it from
there; ``postgres_pool_options``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from gateway.exchanges import schema
from gateway.exchanges.record import Exchange
from gateway.exchanges.rows import from_rows, to_row
from gateway.exchanges.store import (
    COLUMNS,
    StoreMisconfigured,
    StoreRejected,
    StoreUnavailable,
    check_version,
    postgres_pool_options,
)

T = TypeVar("T")

COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
POOL_MAX_SIZE = 4
#: Any constant: the key of the advisory lock migrations hold.
MIGRATION_LOCK = 0x65786C67

_JSON = {"error", "request_ids", "api_key_ids", "messages"}
#: A row already there is one an earlier attempt stored (its commit went
#: through but the answer was lost): nothing to write, nothing refused.
_INSERT = (
    f"INSERT INTO exchanges ({', '.join(COLUMNS)}) VALUES ("
    + ", ".join(f"${i}::jsonb" if c in _JSON else f"${i}" for i, c in enumerate(COLUMNS, 1))
    + ") ON CONFLICT (id) DO NOTHING"
)

#: Errors on our side of the wire that say "not now": connection lost or
#: refused, timeouts.
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)
#: The server's "not now", by SQLSTATE: read-only (a standby, maintenance),
#: lock_timeout, and a role or table an operator has yet to set right
#: (insufficient privilege, no table exchanges): every row would be refused
#: alike until then. Then whole classes: connection (08), invalid
#: authorization (28) and no such database (3D) for a connection the pool
#: opens anew, transaction rollback (40: serialization, deadlock),
#: insufficient resources (53), operator intervention (57: shutdown,
#: starting, statement cancelled). Anything else the server says is about
#: the rows: refused.
_TRANSIENT_SQLSTATES = frozenset({"25006", "55P03", "42501", "42P01"})
_TRANSIENT_CLASSES = frozenset({"08", "28", "3D", "40", "53", "57"})


def _transient(exc: asyncpg.PostgresError) -> bool:
    sqlstate = exc.sqlstate or ""
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in _TRANSIENT_CLASSES


def _described(exc: Exception) -> str:
    """An error fit for a log line. A server's error never brings its
    detail (``Failing row contains (...)``), and a data error (classes 22,
    23) not its message either: both may quote a row's values."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        described = f"{type(exc).__name__} (SQLSTATE {sqlstate})"
        if sqlstate[:2] in _DATA_CLASSES:
            return described
        return f"{described}: {exc.args[0]}" if exc.args else described
    return f"{type(exc).__name__}: {exc}"


#: SQLSTATE classes of errors in the data sent (a value, a constraint).
_DATA_CLASSES = ("22", "23")


def _without_secrets(message: str, url: str) -> str:
    """``message`` on one line, without the URL's password (in its user
    part or its query) should asyncpg quote it."""
    parts = urlsplit(url)
    secrets = [parts.password or ""]
    secrets += [value for name, value in parse_qsl(parts.query) if name == "password"]
    for secret in filter(None, secrets):
        message = message.replace(secret, "[redacted]")
    return " ".join(message.split())


def safe_description(url: str) -> str:
    """host:port/db of the URL, without user or password."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql {parts.hostname or ''}{port}{parts.path}"


class PostgresStore:
    def __init__(
        self,
        url: str,
        *,
        migrations: Sequence[tuple[int, tuple[str, ...]]] = schema.POSTGRES,
        read_only: bool = False,
    ) -> None:
        self._url = url
        self.description = safe_description(url)
        self._migrations = migrations
        #: Reading only (``bin/exchanges --db``): the schema is checked, never changed.
        self._read_only = read_only
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        url, options = postgres_pool_options(self._url)

        async def connect() -> None:
            pool = await asyncpg.create_pool(
                url,
                **options,
                # No floor to keep: a lost server is noticed by the next write,
                # not by a background task logging its own retries.
                min_size=0,
                max_size=POOL_MAX_SIZE,
                command_timeout=COMMAND_TIMEOUT_S,
                timeout=CONNECT_TIMEOUT_S,
            )
            try:
                async with pool.acquire() as connection:
                    if self._read_only:
                        check_version(self.description, await postgres_version(connection),
                                      self._migrations)
                    else:
                        await migrate_postgres(connection, self._migrations)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool

        try:
            await self._call(connect)
        except asyncpg.ClientConfigurationError as exc:
            # asyncpg reads the URL and its options (sslmode,
            # target_session_attrs, ...) at each connect, before any I/O:
            # every later attempt, and so every write, would fail the same.
            raise StoreMisconfigured(f"postgresql: {_without_secrets(str(exc), self._url)}") from exc
        except StoreRejected as exc:
            # Refused at the door (authentication, no such database): to the
            # writer that is a database it cannot use yet, like one that is
            # down; it keeps trying (and dropping, counted) until it can.
            raise StoreUnavailable(str(exc)) from exc
        except StoreUnavailable:
            raise
        except Exception as exc:
            # asyncpg's own checks of the URL and its options. Only the
            # type: its message may quote the URL, password included.
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}") from exc

    async def _call(self, action: Callable[[], Awaitable[T]]) -> T:
        try:
            return await action()
        except asyncpg.ClientConfigurationError:
            raise  # an InterfaceError, but no outage: connect() says so
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"postgresql: {_described(exc)}") from exc
        except asyncpg.PostgresError as exc:
            if _transient(exc):
                raise StoreUnavailable(f"postgresql: {_described(exc)}") from exc
            raise StoreRejected(f"postgresql: {_described(exc)}") from exc

    async def write(self, batch: Sequence[Exchange]) -> None:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("postgresql: not connected")
        rows = [to_row(exchange) for exchange in batch]

        async def write() -> None:
            async with pool.acquire() as connection, connection.transaction():
                await connection.executemany(_INSERT, rows)

        await self._call(write)

    async def recent(
        self, *, limit: int, before: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("postgresql: not connected")
        where: list[str] = []
        params: list[Any] = []
        if before is not None:
            params.append(before)
            where.append(f"seq < (SELECT seq FROM exchanges WHERE id = ${len(params)})")
        if model is not None:
            params.append(model)
            where.append(f"model = ${len(params)}")
        params.append(limit)
        sql = "SELECT * FROM exchanges" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY seq DESC LIMIT ${len(params)}"

        async def fetch() -> list[Any]:
            async with pool.acquire() as connection:
                return list(await connection.fetch(sql, *params))

        return await asyncio.to_thread(from_rows, await self._call(fetch))

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), COMMAND_TIMEOUT_S)
            except (TimeoutError, *_UNAVAILABLE):
                pool.terminate()


async def postgres_version(connection: asyncpg.Connection) -> int:
    """The schema version in force, by plain SELECTs; 0 for none yet."""
    if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", schema.VERSION_TABLE):
        return 0
    return int(await connection.fetchval(
        f"SELECT COALESCE(MAX(version), 0) FROM {schema.VERSION_TABLE}"
    ))


async def migrate_postgres(
    connection: asyncpg.Connection, migrations: Sequence[tuple[int, tuple[str, ...]]]
) -> int:
    """Apply the migrations not applied yet, in one transaction under an
    advisory lock (gateways starting together migrate once); returns the
    schema version now in force. A schema already current is only read, so
    after the first start the role needs no right to change it."""
    current = await postgres_version(connection)
    if current >= schema.latest(migrations):
        return current
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {schema.VERSION_TABLE} "
            "(version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        current = await connection.fetchval(
            f"SELECT COALESCE(MAX(version), 0) FROM {schema.VERSION_TABLE}"
        )
        for version, statements in migrations:
            if version <= current:
                continue
            for statement in statements:
                await connection.execute(statement)
            await connection.execute(
                f"INSERT INTO {schema.VERSION_TABLE} (version) VALUES ($1)", version
            )
            current = version
    return int(current)
