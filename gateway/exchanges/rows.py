"""An exchange as a database row and back (the same for both stores).

Two characters a str may hold are text neither database stores: NUL
(PostgreSQL refuses it in text and in jsonb) and a lone UTF-16 surrogate
(not UTF-8 at all). Each is stored as U+FFFD, in every column, so a
record is never lost to what a client or an upstream put in it and both
stores hold the same. A surrogate pair (an emoji an upstream sent in two
halves) is joined into its character first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Protocol

from gateway.exchanges.record import Exchange, joined

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """``text`` with each NUL and lone surrogate as U+FFFD."""
    if not text.isascii():
        text = joined(text)
    return _UNSTORABLE.sub(REPLACEMENT, text)


def _storable_json(value: Any) -> Any:
    """A copy of a JSON value with every string (keys too) ``storable``."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(str(key)): _storable_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_json(item) for item in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(_storable_json(value), separators=(",", ":"), ensure_ascii=False)


def _text(value: str | None) -> str | None:
    return None if value is None else storable(value)


def to_row(exchange: Exchange) -> tuple[Any, ...]:
    """Values in ``store.COLUMNS`` order; JSON columns as text."""
    usage = exchange.usage
    return (
        exchange.id,
        exchange.created,
        _text(exchange.model),
        _text(exchange.upstream),
        _text(exchange.process),
        exchange.outcome,
        _text(exchange.finish_reason),
        None if exchange.error is None else _json(dict(exchange.error)),
        None if usage is None else usage.prompt_tokens,
        None if usage is None else usage.completion_tokens,
        exchange.ttft_ms,
        exchange.duration_ms,
        exchange.subscribers,
        _json(list(exchange.request_ids)),
        _json(list(exchange.api_key_ids)),
        _json([dict(message) for message in exchange.messages]),
        _text(exchange.resolved_model),
    )


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


class Row(Protocol):
    """A row by column name: sqlite3.Row, asyncpg's Record."""

    def __getitem__(self, column: str) -> Any: ...


def from_row(row: Row) -> dict[str, Any]:
    """The API's shape of an exchange (``Exchange.to_json``)."""
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    usage = None
    if prompt is not None or completion is not None:
        prompt, completion = prompt or 0, completion or 0
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
    return {
        "id": row["id"],
        "object": "exchange",
        "created": int(row["created"]),
        "model": row["model"],
        "resolved_model": row["resolved_model"],
        "upstream": row["upstream"],
        "process": row["process"],
        "messages": _loads(row["messages"]),
        "outcome": row["outcome"],
        "finish_reason": row["finish_reason"],
        "error": None if row["error"] is None else _loads(row["error"]),
        "usage": usage,
        "ttft_ms": row["ttft_ms"],
        "duration_ms": row["duration_ms"],
        "subscribers": row["subscribers"],
        "request_ids": _loads(row["request_ids"]),
        "api_key_ids": _loads(row["api_key_ids"]),
    }


def from_rows(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """``from_row`` of each: the stores run it in a thread (``asyncio.to_thread``),
    since decoding a page with content (up to 1000 prompts and answers)
    would hold the event loop, and every stream with it."""
    return [from_row(row) for row in rows]
