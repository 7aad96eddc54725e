"""The exchange log's schema, as numbered migrations for each database.

A store reads, at connect, the highest version in
``exchange_log_migrations`` (a plain SELECT) and only when migrations are
above it applies them, all in one transaction (taken exclusively, so
gateways starting together against one database migrate it once). A
reader (``bin/exchanges --db``) never applies any. A migration is never edited once released: a
change is a new one at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

VERSION_TABLE = "exchange_log_migrations"

SQLITE: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE exchanges (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            model TEXT NOT NULL,
            upstream TEXT NOT NULL,
            outcome TEXT NOT NULL,
            finish_reason TEXT,
            error TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_ms REAL,
            duration_ms REAL NOT NULL,
            subscribers INTEGER NOT NULL,
            request_ids TEXT NOT NULL,
            messages TEXT NOT NULL
        )""",
    )),
    # Who owned the call (cluster mode) and with which keys; listing by model.
    (2, (
        "ALTER TABLE exchanges ADD COLUMN process TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE exchanges ADD COLUMN api_key_ids TEXT NOT NULL DEFAULT '[]'",
        "CREATE INDEX exchanges_model_seq ON exchanges (model, seq)",
    )),
    # The model the upstream says answered (``gpt-x`` -> ``gpt-x-2025-01-01``).
    (3, ("ALTER TABLE exchanges ADD COLUMN resolved_model TEXT",)),
)

POSTGRES: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE exchanges (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            created DOUBLE PRECISION NOT NULL,
            model TEXT NOT NULL,
            upstream TEXT NOT NULL,
            outcome TEXT NOT NULL,
            finish_reason TEXT,
            error JSONB,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_ms DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL,
            subscribers INTEGER NOT NULL,
            request_ids JSONB NOT NULL,
            messages JSONB NOT NULL
        )""",
    )),
    (2, (
        "ALTER TABLE exchanges ADD COLUMN process TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE exchanges ADD COLUMN api_key_ids JSONB NOT NULL DEFAULT '[]'",
        "CREATE INDEX exchanges_model_seq ON exchanges (model, seq)",
    )),
    (3, ("ALTER TABLE exchanges ADD COLUMN resolved_model TEXT",)),
)

def latest(migrations: Sequence[tuple[int, tuple[str, ...]]]) -> int:
    return max(version for version, _ in migrations)


LATEST = latest(SQLITE)
assert latest(POSTGRES) == LATEST
