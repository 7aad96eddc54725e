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
    """A copy of a JSON value with every string (keys too) ``storable``. A
    walk, not a recursion: a client's tool calls nest as deep as the
    request's parser let them, deeper than the interpreter recurses."""
    root: list[Any] = [None]
    # (container, index or key, value to copy into it), depth first.
    pending: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while pending:
        container, slot, item = pending.pop()
        if isinstance(item, str):
            container[slot] = storable(item)
        elif isinstance(item, dict):
            copy: dict[str, Any] = {storable(str(key)): None for key in item}
            container[slot] = copy
            # Reversed, so that a later key made equal by ``storable`` wins.
            pending.extend((copy, storable(str(key)), child)
                           for key, child in reversed(item.items()))
        elif isinstance(item, list | tuple):
            items: list[Any] = [None] * len(item)
            container[slot] = items
            pending.extend((items, index, child) for index, child in enumerate(item))
        else:
            container[slot] = item
    return root[0]


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
