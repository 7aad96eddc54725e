"""The provider-neutral vocabulary of a streamed answer.

Providers decode their wire format into these; the actor logs them; each API
encodes them back into its own frames. Every kind of delta a provider can send
(text, reasoning, tool-call fragments, usage, finish reason) has a field here,
so a replay to a late joiner carries exactly what the first subscriber saw.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of one tool call; fragments with the same index concatenate."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of an answer. Empty fields mean "nothing of that kind"."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    usage: Usage | None = None
    finish_reason: str | None = None

    @property
    def is_content(self) -> bool:
        """True for what a user sees as a token (TTFT counts from the first one)."""
        return bool(self.text or self.reasoning or self.tool_calls)

    def replay_size(self) -> int:
        """What this delta costs the replay log, in (approximate) bytes.

        Characters, not encoded bytes: cheap to compute once per delta and close
        enough for a budget whose purpose is to bound memory, not to bill.
        """
        size = 64 + len(self.text) + len(self.reasoning)
        for call in self.tool_calls:
            size += 32 + len(call.arguments) + len(call.name or "") + len(call.id or "")
        return size
