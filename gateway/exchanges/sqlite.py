"""The embedded store: one SQLite file in WAL mode, through aiosqlite.

Two connections, each with its own thread (aiosqlite): one writes, one
reads, so listing never waits behind a batch (WAL lets readers run beside
the one writer). Each batch is one transaction. ``synchronous=NORMAL`` in
WAL mode makes a commit survive the process being killed (it is in the
OS's page cache), though not a power cut right after it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite

from gateway.exchanges import schema
from gateway.exchanges.record import Exchange
from gateway.exchanges.rows import from_rows, to_row
from gateway.exchanges.store import COLUMNS, StoreRejected, StoreUnavailable, check_version

#: An id already stored is a batch sent again (``ExchangeStore.write``).
#: Not ``INSERT OR IGNORE``: that would skip a row breaking any other
#: constraint too, silently, where the writer must hear it was refused.
_INSERT = (
    f"INSERT INTO exchanges ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}) ON CONFLICT (id) DO NOTHING"
)
_SELECT = "SELECT * FROM exchanges"
#: How long a statement waits for another process's lock before failing.
BUSY_TIMEOUT_MS = 5000
#: The same while connecting: a file locked at start-up must fail the
#: connect within the writer's 2 s (``ExchangeWriter.start``), not hold a
#: statement its timeout cannot stop (aiosqlite runs it in a thread, so the
#: cleanup after a timeout waits for it).
CONNECT_BUSY_TIMEOUT_MS = 1000


def _translate(exc: Exception) -> Exception:
    """sqlite3's errors by cause: could not do it now, or will never take these rows."""
    if isinstance(exc, UnicodeError | OverflowError):
        # A value of the record SQLite cannot take (text that is not
        # UTF-8, a token count past its 64-bit INTEGER): the record's own
        # problem, whatever the database's state. Only the type: the
        # message may quote the value.
        return StoreRejected(f"sqlite: {type(exc).__name__}")
    if isinstance(exc, sqlite3.OperationalError | OSError | ValueError) or (
        type(exc) is sqlite3.DatabaseError
    ):
        # Locked, I/O error, unable to open, closed connection (aiosqlite's
        # ValueError); and the file itself malformed or not a database
        # (DatabaseError proper, none of its subclasses), which refuses
        # every row alike until it is repaired or replaced.
        return StoreUnavailable(f"sqlite: {exc}")
    return StoreRejected(f"sqlite: {exc}")


def _read_only_uri(path: str) -> str:
    """The URI that opens ``path`` read-only; StoreUnavailable when there is
    no such file (SQLite would say only "unable to open database file")."""
    if not os.path.isfile(path):
        raise StoreUnavailable(f"sqlite {path}: no such file")
    return f"file:{quote(os.path.abspath(path))}?mode=ro"


class SqliteStore:
    def __init__(
        self,
        path: str,
        *,
        migrations: Sequence[tuple[int, tuple[str, ...]]] = schema.SQLITE,
        read_only: bool = False,
    ):
        self.path = path
        self.description = f"sqlite {path}"
        self._migrations = migrations
        #: Reading only (``bin/exchanges --db``): the file must exist, and
        #: is opened read-only (no writer, no migration, no directory made).
        self._read_only = read_only
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

    async def connect(self) -> None:
        try:
            if self._read_only:
                self._reader = await self._connect_reader()
            else:
                self._writer, self._reader = await self._connect_writer()
        except (sqlite3.Error, OSError) as exc:
            # Whatever keeps us from using the file (not a database, no
            # permission, locked) is one the writer cannot use yet.
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _connect_writer(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        writer = await self._open(busy_timeout_ms=CONNECT_BUSY_TIMEOUT_MS)
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            await migrate_sqlite(writer, self._migrations)
            await writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return writer, await self._open()
        except BaseException:
            await writer.close()
            raise

    async def _connect_reader(self) -> aiosqlite.Connection:
        reader = await self._open(read_only=True)
        try:
            check_version(self.description, await sqlite_version(reader), self._migrations)
        except BaseException:
            await reader.close()
            raise
        return reader

    async def _open(
        self, *, read_only: bool = False, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> aiosqlite.Connection:
        if read_only:
            connection = await aiosqlite.connect(
                _read_only_uri(self.path), uri=True, timeout=busy_timeout_ms / 1000
            )
        else:
            connection = await aiosqlite.connect(self.path, timeout=busy_timeout_ms / 1000)
        try:
            connection.row_factory = sqlite3.Row
            await connection.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            # Each connection is a thread of its own: one left open keeps
            # the process from exiting.
            await connection.close()
            raise
        return connection

    async def write(self, batch: Sequence[Exchange]) -> None:
        if self._writer is None:
            raise StoreUnavailable("sqlite: not connected")
        rows = [to_row(exchange) for exchange in batch]
        try:
            await self._writer.executemany(_INSERT, rows)
            await self._writer.commit()
        except (sqlite3.Error, OSError, ValueError, OverflowError) as exc:
            try:
                await self._writer.rollback()
            except (sqlite3.Error, ValueError):
                pass  # the transaction is gone with whatever broke it
            raise _translate(exc) from exc

    async def recent(
        self, *, limit: int, before: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        if self._reader is None:
            raise StoreUnavailable("sqlite: not connected")
        where, params = [], []
        if before is not None:
            where.append("seq < (SELECT seq FROM exchanges WHERE id = ?)")
            params.append(before)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ?"
        try:
            async with self._reader.execute(sql, (*params, limit)) as cursor:
                rows = await cursor.fetchall()
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise _translate(exc) from exc
        return await asyncio.to_thread(from_rows, rows)

    async def aclose(self) -> None:
        for connection in (self._writer, self._reader):
            if connection is not None:
                await connection.close()
        self._writer = self._reader = None


async def sqlite_version(connection: aiosqlite.Connection) -> int:
    """The schema version in force, by plain SELECTs; 0 for none yet."""
    async with connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (schema.VERSION_TABLE,)
    ) as cursor:
        if await cursor.fetchone() is None:
            return 0
    async with connection.execute(
        f"SELECT COALESCE(MAX(version), 0) FROM {schema.VERSION_TABLE}"
    ) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def migrate_sqlite(
    connection: aiosqlite.Connection, migrations: Sequence[tuple[int, tuple[str, ...]]]
) -> int:
    """Apply the migrations not applied yet, in one exclusive transaction;
    returns the schema version now in force. A schema already current is
    only read: no write lock, no DDL."""
    current = await sqlite_version(connection)
    if current >= schema.latest(migrations):
        return current
    await connection.execute("BEGIN IMMEDIATE")
    try:
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {schema.VERSION_TABLE} "
            "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
        )
        async with connection.execute(
            f"SELECT COALESCE(MAX(version), 0) FROM {schema.VERSION_TABLE}"
        ) as cursor:
            row = await cursor.fetchone()
        current = int(row[0]) if row is not None else 0
        for version, statements in migrations:
            if version <= current:
                continue
            for statement in statements:
                await connection.execute(statement)
            await connection.execute(
                f"INSERT INTO {schema.VERSION_TABLE} (version, applied) "
                "VALUES (?, strftime('%s','now'))",
                (version,),
            )
            current = version
        await connection.commit()
    except BaseException:
        await connection.rollback()
        raise
    return current
