"""Deterministic answers: the same messages always get the same tokens.

Tests compute the exact text they expect by calling ``answer_tokens`` with the
messages they sent, so the answer depends on the messages and nothing else
(not the model name, the provider format, or the knobs but the token count and
size). Messages are canonicalised to (role, text) first: an OpenAI
``"content": "hi"`` and an Anthropic ``"content": [{"type": "text", "text":
"hi"}]`` are the same prompt, so a conversation gets the same answer whichever
provider format carried it.

About one token in ten is multi-byte UTF-8 (2, 3 and 4 bytes), so a client
that splits or decodes at byte boundaries instead of character boundaries
shows it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

_ASCII_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "at", "this", "from", "are", "or", "an", "not", "but", "which", "have", "has", "had",
    "one", "all", "were", "when", "there", "can", "more", "if", "will", "about", "into", "than",
    "them", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "only",
    "its", "new", "after", "way", "many", "must", "through", "back", "years", "where", "much",
    "your", "well", "down", "should", "because", "each", "just", "those", "how", "too", "good",
    "very", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between",
    "both", "life", "being", "under", "never",
)

# 2-byte Latin, 3-byte CJK and Cyrillic, 4-byte emoji.
_MULTIBYTE_WORDS = (
    "café", "naïve", "résumé", "über", "façade", "日本語", "数据", "Привет", "😀", "🚀",
)

#: Ninety ASCII words and ten multi-byte ones: a uniform draw is multi-byte
#: one time in ten.
VOCABULARY: tuple[str, ...] = tuple(_ASCII_WORDS) + _MULTIBYTE_WORDS


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message: a string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def canonical_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m.get("role", "")), "content": message_text(m)} for m in messages]


def prompt_digest(messages: Sequence[Mapping[str, Any]]) -> bytes:
    """sha256 of the canonical JSON of the messages (sorted keys, no spaces)."""
    canonical = json.dumps(
        canonical_messages(messages), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).digest()


def prompt_token_count(messages: Sequence[Mapping[str, Any]]) -> int:
    """A deterministic stand-in for the prompt's token count: its words."""
    return sum(len(message_text(m).split()) for m in messages)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last ``user`` message (where directives are read)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def tokens_from_digest(digest: bytes, n_tokens: int, token_size: int | None = None) -> list[str]:
    """The answer for a prompt digest (see ``answer_tokens``)."""
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    # choices() draws one random() per token in order, so a shorter answer is
    # a prefix of a longer one: max_tokens truncates, it does not re-draw.
    words = rng.choices(VOCABULARY, k=n_tokens)
    if token_size is None:
        return [word if index == 0 else " " + word for index, word in enumerate(words)]
    return [_sized(word if index == 0 else " " + word, token_size) for index, word in enumerate(words)]


def _sized(unit: str, size: int) -> str:
    """``unit`` repeated and cut to exactly ``size`` characters."""
    return (unit * (size // len(unit) + 1))[:size]


def answer_tokens(
    messages: Sequence[Mapping[str, Any]], n_tokens: int, token_size: int | None = None
) -> list[str]:
    """The tokens the simulator answers ``messages`` with.

    Words with a leading space (the first one without); with ``token_size``,
    each token is exactly that many characters. Deterministic: a PRNG seeded
    from ``prompt_digest(messages)``.
    """
    return tokens_from_digest(prompt_digest(messages), n_tokens, token_size)
