"""JSON on the hot path: every relayed chunk is parsed once (the upstream's)
and encoded once (ours).

orjson (the ``fast`` extra) when installed, the standard library otherwise;
both give the same compact UTF-8 (no spaces, non-ASCII as is) for what the
gateway writes: strings, integers, and floats up to the spelling of an
exponent (``1e-07`` against ``1e-7``, the same number). Encoding and
decoding were ~16 % of the gateway's CPU per relayed chunk with the standard
library. Where orjson refuses what the standard
library accepts -- integers beyond 64 bits to encode; lone surrogates in
``\\u`` escapes or NaN to decode -- the standard library decides. One
difference stays: orjson reads an integer beyond 64 bits as a float (the
numbers in upstream chunks are token counts and indexes). ``GATEWAY_ORJSON=0``
turns orjson off (``python -m gateway`` calls ``use_standard_library()`` before
serving).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = [
    "BACKEND", "NestedTooDeeply", "dumps", "dumps_to_keep", "loads", "use_standard_library",
]


class NestedTooDeeply(ValueError):
    """A value nested deeper than the interpreter recurses, to read or to
    write: bad input, not a failure of ours."""


_STDLIB_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def stdlib_dumps(value: Any) -> bytes:
    try:
        return _STDLIB_ENCODER.encode(value).encode()
    except UnicodeEncodeError:
        # A lone surrogate (an upstream may send "\ud800"): no UTF-8 spells
        # it, a JSON escape does, and every JSON parser reads it back.
        return _ASCII_ENCODER.encode(value).encode()
    except RecursionError as exc:
        raise NestedTooDeeply("JSON nested too deeply") from exc


def stdlib_loads(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise NestedTooDeeply("JSON nested too deeply") from exc


def orjson_codec() -> tuple[Callable[[Any], bytes], Callable[[str | bytes], Any]] | None:
    """orjson's (dumps, loads) with the standard library as the judge of
    what orjson refuses; None when it is not installed."""
    try:
        import orjson
    except ImportError:
        return None
    orjson_dumps, orjson_loads, decode_error = orjson.dumps, orjson.loads, orjson.JSONDecodeError

    def dumps(value: Any) -> bytes:
        try:
            return orjson_dumps(value)
        except TypeError:
            return stdlib_dumps(value)

    def loads(data: str | bytes) -> Any:
        try:
            return orjson_loads(data)
        except decode_error:
            return stdlib_loads(data)  # the same verdict as without orjson

    return dumps, loads


_fast = orjson_codec()
#: Which implementation serves: "orjson" or "json".
BACKEND = "json" if _fast is None else "orjson"
#: ``value`` as compact UTF-8 JSON bytes.
dumps: Callable[[Any], bytes] = stdlib_dumps if _fast is None else _fast[0]
#: One JSON document; raises ``ValueError`` (``json.JSONDecodeError``) when invalid.
loads: Callable[[str | bytes], Any] = stdlib_loads if _fast is None else _fast[1]


def use_standard_library() -> None:
    """Serve with the standard library from now on (GATEWAY_ORJSON=0): a
    process-wide choice, made once at start-up like the event loop's."""
    global _fast, BACKEND, dumps, loads
    _fast, BACKEND, dumps, loads = None, "json", stdlib_dumps, stdlib_loads


def dumps_to_keep(value: Any) -> bytes:
    """``dumps`` for bytes held beyond the moment (an upstream request body,
    kept for a retry while its stream lives): orjson's result holds a 4 KiB
    buffer whatever its length, a copy only its length. Frames need no copy:
    framing them (``b"data: " + ...``) already makes a new object."""
    data = dumps(value)
    return data if _fast is None else bytes(memoryview(data))
