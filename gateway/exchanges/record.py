"""An exchange: what one upstream call sent and got back, as a frozen value.

Messages keep their text only when the log stores content
(``EXCHANGE_LOG_CONTENT=1``); otherwise each keeps its role, its length in
characters and the SHA-256 of its text, enough to tell two answers apart or
to match a message a user shows you, never enough to read it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["OUTCOMES", "Exchange", "Usage", "joined", "message_summary", "request_messages",
           "text_of", "utf8"]

#: How an upstream call ended: its answer ended normally; it failed (the
#: upstream, or the gateway stopping mid-stream); every subscriber left.
OUTCOMES = ("complete", "failed", "cancelled")

#: What a record holds besides its strings, roughly: the objects, numbers
#: and tuples (``Exchange.held_bytes``).
_RECORD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_json(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class Exchange:
    id: str
    #: Unix seconds at the upstream call.
    created: float
    #: The model the client asked for.
    model: str
    #: Which upstream answered (a name, never a URL with credentials).
    upstream: str
    #: The gateway process that owned the call (host:pid).
    process: str
    #: The request's messages as sent up, then the assistant's answer; each a
    #: JSON object with at least ``role`` and ``content`` (None without content).
    messages: tuple[Mapping[str, Any], ...]
    outcome: str
    finish_reason: str | None
    #: ``{"code", "message"}`` for a failed call.
    error: Mapping[str, str] | None
    usage: Usage | None
    #: From the upstream call to its first content delta; None without one.
    ttft_ms: float | None
    duration_ms: float
    #: How many requests shared this call, their ids, and the distinct ids of
    #: the API keys they came with (a SHA-256 of the key, never the key).
    subscribers: int
    request_ids: tuple[str, ...]
    api_key_ids: tuple[str, ...]
    #: The model the upstream says answered; None: it did not say.
    resolved_model: str | None = None

    def held_bytes(self) -> int:
        """Roughly the memory the record holds: its strings (with content
        on, the whole prompt and answer) and a fixed part. For the writer's
        bound on what waits for the database."""
        size = _RECORD_BYTES
        # A walk, not a recursion: tool calls nest as deep as a client sent them.
        pending: list[Any] = [self.messages, self.request_ids, self.api_key_ids]
        while pending:
            value = pending.pop()
            if isinstance(value, str):
                size += sys.getsizeof(value)
            elif isinstance(value, Mapping):
                pending.extend(value.values())
            elif isinstance(value, list | tuple):
                pending.extend(value)
        return size

    def to_json(self) -> dict[str, Any]:
        """The API's shape (``GET /v1/exchanges``)."""
        return {
            "id": self.id,
            "object": "exchange",
            "created": int(self.created),
            "model": self.model,
            "resolved_model": self.resolved_model,
            "upstream": self.upstream,
            "process": self.process,
            "messages": [dict(message) for message in self.messages],
            "outcome": self.outcome,
            "finish_reason": self.finish_reason,
            "error": None if self.error is None else dict(self.error),
            "usage": None if self.usage is None else self.usage.to_json(),
            "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
            "subscribers": self.subscribers,
            "request_ids": list(self.request_ids),
            "api_key_ids": list(self.api_key_ids),
        }


def text_of(content: Any) -> str:
    """A message's content as one string: itself, or its parts as compact JSON."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return json.dumps(content, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def joined(text: str) -> str:
    """``text`` with each surrogate pair as the one character it stands for.
    A stream may carry an emoji as two JSON escapes in two chunks
    (``"\\ud83d"``, then ``"\\ude00"``); joined, the text is what a client
    shows. A lone surrogate stays as it is."""
    if text.isascii():
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate as its own three bytes: any str a
    JSON parser hands us can be hashed (strict UTF-8 refuses surrogates)."""
    return text.encode("utf-8", "surrogatepass")


def message_summary(role: str, text: str, *, keep_content: bool) -> dict[str, Any]:
    """``{role, content}`` with the text, or ``{role, content: None, length, sha256}``."""
    if keep_content:
        return {"role": role, "content": text}
    return {
        "role": role,
        "content": None,
        "length": len(text),
        "sha256": hashlib.sha256(utf8(text)).hexdigest(),
    }


def request_messages(body: Mapping[str, Any], *, keep_content: bool) -> tuple[dict[str, Any], ...]:
    """The request's messages, summarised (validated upstream of here: a list of objects)."""
    messages = body.get("messages")
    if not isinstance(messages, Sequence):
        return ()
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        summary = message_summary(
            str(message.get("role", "")), text_of(message.get("content")), keep_content=keep_content
        )
        if keep_content and message.get("tool_calls"):
            summary["tool_calls"] = message["tool_calls"]
        out.append(summary)
    return tuple(out)
