"""The internal stream's format and the directory's values, without I/O.

The internal stream (owner -> follower) is newline-delimited JSON, one object
per line: a delta ``{"t","r","c","u","w","f","s",...}`` (empty fields left out), then one
end line, ``{"end": "complete"}`` or ``{"error": {...}}``. A stream that stops
without an end line means the owner went away. Deltas are numbered by their
position, as in the owner's log: the follower's log mirrors it one for one,
so a Last-Event-ID means the same delta on every process.

A directory value is ``o <instance> <url>`` (the owner) or ``e <json>`` (the
failure the stream ended with, kept for the error TTL).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actors.deltas import (
    FUNCTION,
    Delta,
    Logprobs,
    StreamInfo,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from gateway import json_codec
from gateway.errors import GatewayError, for_client

__all__ = [
    "END_LINE",
    "FailureEntry",
    "LineDecoder",
    "Owner",
    "RemoteFailure",
    "WireError",
    "decode_entry",
    "encode_delta",
    "encode_deltas",
    "encode_failure",
    "error_line",
    "owner_entry",
]

END_LINE = b'{"end":"complete"}\n'


class WireError(ValueError):
    """A line or value that is not in this format."""


class RemoteFailure(GatewayError):
    """The failure another process's stream ended with, as that process
    would have told its own clients (status, type, code, retryable, a 429's
    Retry-After)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("message") or "upstream error"), code=str(body.get("code")))
        self.status = int(body.get("status") or 502)
        self.type = str(body.get("type") or "upstream_error")
        self.retryable = bool(body.get("retryable"))
        retry_after = body.get("retry_after")
        self._retry_after = str(retry_after) if retry_after else None

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self._retry_after} if self._retry_after else {}


def _delta_json(delta: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.text:
        out["t"] = delta.text
    if delta.reasoning:
        out["r"] = delta.reasoning
    if delta.tool_calls:
        # A kind other than a function's as a fifth member, which a member of
        # an earlier release leaves out (it reads the first four).
        out["c"] = [
            [c.index, c.id, c.name, c.arguments] + ([] if c.kind == FUNCTION else [c.kind])
            for c in delta.tool_calls
        ]
    if delta.usage is not None:
        u = delta.usage
        out["u"] = [u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens]
        if u.cache_write_tokens is not None:
            # A key of its own: a member of an earlier release reads "u" as
            # four counts, and leaves out the keys it does not know.
            out["w"] = u.cache_write_tokens
    if delta.finish_reason:
        out["f"] = delta.finish_reason
    if delta.stop_sequence is not None:
        out["s"] = delta.stop_sequence
    if delta.refusal:
        out["x"] = delta.refusal
    if delta.logprobs is not None:
        out["l"] = [_tokens_json(delta.logprobs.content), _tokens_json(delta.logprobs.refusal)]
    if delta.info is not None:
        out["i"] = [delta.info.model, delta.info.system_fingerprint]
    return out


def _tokens_json(tokens: Sequence[TokenLogprob]) -> list[Any]:
    return [
        [t.token, t.logprob, t.bytes, [[o.token, o.logprob, o.bytes] for o in t.top_logprobs]]
        for t in tokens
    ]


def _tokens(rows: Sequence[Any]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            row[0], row[1], None if row[2] is None else tuple(row[2]),
            tuple(TopLogprob(o[0], o[1], None if o[2] is None else tuple(o[2])) for o in row[3]),
        )
        for row in rows
    )


def encode_delta(seq: int, delta: Delta) -> bytes:
    """One delta's line (``seq`` unused: the position is the line's order).
    The codec the frames use (orjson when installed), looked up per call:
    GATEWAY_ORJSON=0 swaps it at start-up."""
    return json_codec.dumps(_delta_json(delta)) + b"\n"


def encode_deltas(deltas: Sequence[Delta]) -> bytes:
    return b"".join([encode_delta(0, d) for d in deltas])


def _failure_json(exc: GatewayError) -> dict[str, Any]:
    """The failure as the owner's own clients are told it: on the other
    process it is a plain ``GatewayError``, passed on as it stands, so the
    raw message (a provider's error page, an upstream's address) must not
    leave the owner, whose log has it."""
    told = for_client(exc)
    body: dict[str, Any] = {
        "status": told.status,
        "type": told.type,
        "code": told.code,
        "message": told.message,
        "retryable": told.retryable,
    }
    if retry_after := told.headers().get("Retry-After"):
        body["retry_after"] = retry_after  # a 429's, for the clients' Retry-After
    return body


def error_line(exc: GatewayError) -> bytes:
    return json.dumps({"error": _failure_json(exc)}, separators=(",", ":")).encode() + b"\n"


def _delta(obj: dict[str, Any]) -> Delta:
    usage = obj.get("u")
    logprobs = obj.get("l")
    info = obj.get("i")
    return Delta(
        text=obj.get("t", ""),
        reasoning=obj.get("r", ""),
        tool_calls=tuple(
            ToolCallDelta(c[0], c[1], c[2], c[3], c[4] if len(c) > 4 else FUNCTION)
            for c in obj.get("c", ())
        ),
        usage=None if usage is None else Usage(
            usage[0], usage[1], usage[2], usage[3], cache_write_tokens=obj.get("w")
        ),
        finish_reason=obj.get("f"),
        refusal=obj.get("x", ""),
        logprobs=None if logprobs is None else Logprobs(_tokens(logprobs[0]), _tokens(logprobs[1])),
        info=None if info is None else StreamInfo(info[0], info[1]),
        stop_sequence=obj.get("s"),
    )


class LineDecoder:
    """Bytes in, deltas out; ``ended`` once the end line was read, and
    ``failure`` set when that was a failure line. ``feed`` still returns the
    deltas read with a failure line: one read may hold an answer's last
    deltas and its failure, and they come first."""

    __slots__ = ("_buffer", "ended", "failure")

    def __init__(self) -> None:
        self._buffer = b""
        self.ended = False
        self.failure: RemoteFailure | None = None

    def feed(self, data: bytes) -> list[Delta]:
        buffer = self._buffer + data
        *lines, self._buffer = buffer.split(b"\n")
        deltas: list[Delta] = []
        for line in lines:
            if not line or self.ended:
                continue
            try:
                obj = json_codec.loads(line)
            except ValueError as exc:
                raise WireError("a line of the internal stream is not JSON") from exc
            if not isinstance(obj, dict):
                raise WireError("a line of the internal stream is not an object")
            if "end" in obj:
                self.ended = True
            elif "error" in obj:
                self.ended = True
                self.failure = RemoteFailure(obj["error"])
            else:
                deltas.append(_delta(obj))
        return deltas


# -- directory values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    #: Random per process: a restarted process on the same address is another owner.
    instance: str
    url: str


@dataclass(frozen=True, slots=True)
class FailureEntry:
    error: RemoteFailure


def owner_entry(owner: Owner) -> bytes:
    return f"o {owner.instance} {owner.url}".encode()


def encode_failure(exc: GatewayError) -> bytes:
    return b"e " + json.dumps(_failure_json(exc), separators=(",", ":")).encode()


def decode_entry(value: bytes) -> Owner | FailureEntry:
    kind, _, rest = value.partition(b" ")
    try:
        if kind == b"o":
            instance, _, url = rest.decode().partition(" ")
            if url:
                return Owner(instance, url)
        elif kind == b"e":
            body = json.loads(rest)
            if isinstance(body, dict):
                return FailureEntry(RemoteFailure(body))
    except (UnicodeDecodeError, ValueError):
        pass
    raise WireError("not a directory value of this gateway")
