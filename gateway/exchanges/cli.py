"""``bin/exchanges``: the recent exchanges as a table.

Reads a running gateway's ``GET /v1/exchanges`` (``--url``, default
``$GATEWAY_URL`` or http://127.0.0.1:8080; an admin key from
``$GATEWAY_ADMIN_KEY``), or the database itself (``--db``, an
EXCHANGE_LOG_URL) when no gateway runs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from gateway.exchanges.store import MAX_LIMIT, StoreError, open_store, parse_store_url

COLUMNS = ("created", "id", "model", "outcome", "finish", "msgs", "subs", "prompt", "compl",
           "ttft_ms", "dur_ms")
#: Right-aligned (numbers).
NUMERIC = frozenset({"msgs", "subs", "prompt", "compl", "ttft_ms", "dur_ms"})


#: C0 and C1 control characters, DEL included: a terminal acts on them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` with each control character as its Python escape (``\\n``,
    ``\\x1b``): a model name is the client's to choose, and one holding an
    escape sequence or a line break must neither drive the operator's
    terminal nor split a row of the table."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return _printable(str(value))


def row_of(exchange: dict[str, Any]) -> dict[str, str]:
    usage = exchange.get("usage") or {}
    finish = exchange.get("finish_reason")
    if finish is None and exchange.get("error"):
        finish = exchange["error"].get("code")
    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(exchange["created"])),
        "id": _cell(exchange["id"]),
        "model": _cell(exchange["model"]),
        "outcome": _cell(exchange["outcome"]),
        "finish": _cell(finish),
        "msgs": _cell(len(exchange.get("messages") or [])),
        "subs": _cell(exchange["subscribers"]),
        "prompt": _cell(usage.get("prompt_tokens")),
        "compl": _cell(usage.get("completion_tokens")),
        "ttft_ms": _cell(exchange.get("ttft_ms")),
        "dur_ms": _cell(exchange.get("duration_ms")),
    }


def table(exchanges: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one line per exchange, newest first (UTC times)."""
    rows = [row_of(exchange) for exchange in exchanges]
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in COLUMNS}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(
            cells[c].rjust(widths[c]) if c in NUMERIC else cells[c].ljust(widths[c]) for c in COLUMNS
        ).rstrip()

    return "\n".join([line({c: c.upper() for c in COLUMNS}), *(line(row) for row in rows)])


def from_gateway(url: str, key: str | None, limit: int, model: str | None) -> list[dict[str, Any]]:
    query = {"limit": str(limit), **({"model": model} if model else {})}
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/exchanges?" + urllib.parse.urlencode(query),
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.load(response)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("the answer is not a list of exchanges")
    return data


async def from_database(url: str, limit: int, model: str | None) -> list[dict[str, Any]]:
    """Read-only: a missing file or table is an error, never a new log, and
    a live log's schema is never changed from here."""
    store = open_store(url, read_only=True)
    await store.connect()
    try:
        return await store.recent(limit=limit, model=model)
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exchanges", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080"),
                        help="the gateway (default: $GATEWAY_URL or http://127.0.0.1:8080)")
    parser.add_argument("--db", help="read this EXCHANGE_LOG_URL instead of a gateway")
    parser.add_argument("--limit", type=int, default=20, help=f"how many (1..{MAX_LIMIT})")
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--json", action="store_true", help="the exchanges as JSON lines")
    args = parser.parse_args(argv)
    if not 1 <= args.limit <= MAX_LIMIT:
        parser.error(f"--limit must be from 1 to {MAX_LIMIT}")
    try:
        if args.db:
            try:
                parse_store_url(args.db)
            except ValueError:
                parser.error("--db must be sqlite:///path.db or postgresql://user@host:port/db")
            exchanges = asyncio.run(from_database(args.db, args.limit, args.model))
        else:
            try:
                exchanges = from_gateway(args.url, os.environ.get("GATEWAY_ADMIN_KEY"), args.limit,
                                         args.model)
            except (http.client.HTTPException, ValueError) as exc:
                # Not a URL urllib can use (a port that is no number), or an
                # answer no gateway gives (a proxy's sign-in page, other JSON).
                print(f"exchanges: {args.url}: {exc}", file=sys.stderr)
                return 1
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"exchanges: {args.url}: HTTP {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (OSError, StoreError) as exc:
        print(f"exchanges: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for exchange in exchanges:
            print(json.dumps(exchange))
    else:
        print(table(exchanges))
    return 0


if __name__ == "__main__":
    sys.exit(main())
