"""The provider-neutral vocabulary of a streamed answer.

Providers decode their wire format into these; the actor logs them; each API
encodes them back into its own frames. Every kind of delta a provider can send
(text, reasoning, refusal, tool-call fragments, log probabilities, usage,
finish reason, the stream's resolved model) has a field here,
so a replay to a late joiner carries exactly what the first subscriber saw.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A tool call's kinds, as OpenAI's chat completions name them.
FUNCTION = "function"
#: A custom tool's call: free text (``arguments``) rather than JSON arguments.
CUSTOM = "custom"
#: The legacy ``function_call`` (before ``tools``): one call, no id.
FUNCTION_CALL = "function_call"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of one tool call; fragments with the same index concatenate.
    ``arguments`` is a function's JSON arguments, or a custom tool's input."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    kind: str = FUNCTION


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log probability, with the alternatives asked for."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Logprobs:
    """The log probabilities of a delta's tokens: of its text (``content``)
    or of its refusal (``refusal``)."""

    content: tuple[TokenLogprob, ...] = ()
    refusal: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the upstream says about the whole answer: the model that
    actually served it (``gpt-x`` resolves to ``gpt-x-2025-01-01``) and its
    backend configuration's fingerprint. ``None``: not reported."""

    model: str | None = None
    system_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Prompt tokens read from the provider's prompt cache; None: not reported.
    cached_tokens: int | None = None
    #: Completion tokens spent on reasoning; None: not reported.
    reasoning_tokens: int | None = None
    #: Prompt tokens written to the provider's prompt cache (Anthropic's
    #: cache_creation_input_tokens, billed apart); None: not reported.
    cache_write_tokens: int | None = None

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
    #: The model's refusal, streamed in place of text.
    refusal: str = ""
    logprobs: Logprobs | None = None
    #: Providers set it once, on the first delta they can (the actor keeps
    #: the first one seen for the stream's whole life).
    info: StreamInfo | None = None
    #: With a finish_reason "stop": the stop sequence that ended the answer,
    #: when the provider says which (Anthropic's stop_sequence).
    stop_sequence: str | None = None

    @property
    def is_content(self) -> bool:
        """True for what a user sees as a token (TTFT counts from the first one)."""
        return bool(self.text or self.reasoning or self.tool_calls or self.refusal)

    def replay_size(self) -> int:
        """What this delta costs the replay log, in (approximate) bytes.

        Characters, not encoded bytes: cheap to compute once per delta and close
        enough for a budget whose purpose is to bound memory, not to bill.
        """
        size = 64 + len(self.text) + len(self.reasoning) + len(self.refusal)
        if self.logprobs is not None:
            for entry in self.logprobs.content + self.logprobs.refusal:
                size += 48 + len(entry.token) + 32 * len(entry.top_logprobs)
        for call in self.tool_calls:
            size += 32 + len(call.arguments) + len(call.name or "") + len(call.id or "")
        return size
