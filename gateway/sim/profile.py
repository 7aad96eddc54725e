"""The simulator's knobs: one frozen dataclass and the ways to set it.

A knob is set, from weakest to strongest, by its default, the process
(``SIM_TTFT_MS`` in the environment, then ``--ttft-ms`` on the command line),
a request header (``x-sim-ttft-ms``) and a directive in the prompt
(``[sim ttft_ms=1500 tokens=20]`` in the last user message). The directive
exists because a gateway forwards no client headers: a test talking to the
simulator *through* the gateway steers it with the prompt text alone.

Values always arrive as text; each knob owns its parser, and ``SimProfile``
validates ranges in one place (``__post_init__``), so a bad value fails the
same way whatever its source, naming the knob.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

GoawayMode = Literal["graceful", "refuse"]
GOAWAY_MODES: tuple[GoawayMode, ...] = ("graceful", "refuse")

HEADER_PREFIX = "x-sim-"
ENV_PREFIX = "SIM_"

#: The longest answer: its tokens are made whole before the first one goes
#: out, on the event loop (in ``make run``, the gateway's own), so a prompt's
#: ``[sim tokens=100000000]`` would stall that loop and exhaust its memory.
MAX_TOKENS = 1_000_000
MAX_ANSWER_CHARS = 16 * 1024 * 1024

T = TypeVar("T")


class KnobError(ValueError):
    """A knob name or value the simulator does not accept; the message names it."""


def _parse_float(text: str) -> float:
    return float(text)


def _parse_int(text: str) -> int:
    return int(text)


def _optional(parse: Callable[[str], T]) -> Callable[[str], T | None]:
    def parse_optional(text: str) -> T | None:
        return None if text.strip().lower() in ("", "none", "off") else parse(text)

    return parse_optional


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError("expected 1 or 0")


def _parse_goaway(text: str) -> GoawayMode:
    for mode in GOAWAY_MODES:
        if text == mode:
            return mode
    raise ValueError(f"expected one of {', '.join(GOAWAY_MODES)}")


def _knob(
    default: T,
    parse: Callable[[str], Any],
    help: str,
    *,
    per_request: bool = True,
    header: str | None = None,
) -> T:
    """A dataclass field carrying how to parse it and where it may be set."""
    metadata = {"parse": parse, "help": help, "per_request": per_request, "header": header}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class SimProfile:
    """How the simulated model behaves. Defaults model an 8B model on one GPU
    (llm-d-inference-sim's numbers): ~100±20 ms TTFT, ~12±2 ms between tokens."""

    ttft_ms: float = _knob(100.0, _parse_float, "time to first token")
    ttft_jitter_ms: float = _knob(20.0, _parse_float, "uniform jitter on the TTFT (±)")
    itl_ms: float = _knob(12.0, _parse_float, "inter-token latency")
    itl_jitter_ms: float = _knob(2.0, _parse_float, "uniform jitter on each gap (±)")
    tokens: int = _knob(
        64, _parse_int, f"output tokens, at most {MAX_TOKENS} (the request's max_tokens caps them)"
    )
    token_size: int | None = _knob(
        None,
        _optional(_parse_int),
        f"exact characters per token, at most {MAX_ANSWER_CHARS} in all (default: natural words)",
    )
    max_concurrency: int = _knob(
        0,
        _parse_int,
        "requests generating at once; more wait in a FIFO queue (0: unlimited)",
        per_request=False,
    )
    max_concurrent_streams: int = _knob(
        1000, _parse_int, "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS", per_request=False
    )
    initial_window_size: int = _knob(
        65535, _parse_int, "HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE we advertise", per_request=False
    )
    fail_status: int | None = _knob(
        None, _optional(_parse_int), "answer this error status in the provider's shape"
    )
    retry_after_s: int = _knob(
        1, _parse_int, "Retry-After sent with 429/503", header="x-sim-retry-after"
    )
    reset_after: int | None = _knob(
        None, _optional(_parse_int), "after K tokens: RST_STREAM (HTTP/1.1: abort)"
    )
    kill_after: int | None = _knob(
        None, _optional(_parse_int), "after K tokens: abort the whole TCP connection"
    )
    goaway: GoawayMode | None = _knob(
        None, _optional(_parse_goaway), "send GOAWAY on arrival: graceful or refuse"
    )
    malformed_after: int | None = _knob(
        None, _optional(_parse_int), "after K tokens: one data line that is not JSON, then end"
    )
    fault_requests: int | None = _knob(
        None,
        _optional(_parse_int),
        "inject the faults above into the first N model requests only, then serve",
        per_request=False,
    )
    seed: int = _knob(0, _parse_int, "seed of the timing jitter (content depends on the prompt)")
    resolved_model: str | None = _knob(
        None, _optional(str), "model name the answer reports (default: the requested one)"
    )
    fingerprint: str | None = _knob(
        None, _optional(str), "OpenAI system_fingerprint sent in every chunk"
    )
    logprobs: bool = _knob(False, _parse_bool, "OpenAI per-token logprobs (1 or 0)")
    refusal: bool = _knob(False, _parse_bool, "answer as a refusal (1 or 0)")
    cached_tokens: int | None = _knob(
        None, _optional(_parse_int), "usage: prompt tokens read from a cache"
    )
    reasoning_tokens: int | None = _knob(
        None, _optional(_parse_int), "usage: completion tokens spent reasoning (OpenAI)"
    )

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "ttft_jitter_ms", "itl_ms", "itl_jitter_ms"):
            # NaN is false in every comparison, so "< 0" lets it through, and
            # it makes every deadline "now"; an infinite jitter draws NaN gaps.
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise KnobError(f"{name} must be a finite number >= 0")
        for name in ("tokens", "max_concurrency", "retry_after_s"):
            if getattr(self, name) < 0:
                raise KnobError(f"{name} must be >= 0")
        for name in (
            "token_size", "reset_after", "kill_after", "malformed_after",
            "cached_tokens", "reasoning_tokens", "fault_requests",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise KnobError(f"{name} must be >= 0")
        if self.token_size == 0:
            raise KnobError("token_size must be >= 1")
        if self.tokens > MAX_TOKENS:
            raise KnobError(f"tokens must be <= {MAX_TOKENS}")
        if self.token_size is not None and self.tokens * self.token_size > MAX_ANSWER_CHARS:
            raise KnobError(f"tokens * token_size must be <= {MAX_ANSWER_CHARS} characters")
        if self.max_concurrent_streams < 1:
            raise KnobError("max_concurrent_streams must be >= 1")
        # RFC 9113 §6.5.2: SETTINGS_INITIAL_WINDOW_SIZE is at most 2^31-1.
        if not 0 <= self.initial_window_size <= 2**31 - 1:
            raise KnobError("initial_window_size must be in 0..2147483647")
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise KnobError("fail_status must be an error status (400..599)")
        if self.goaway is not None and self.goaway not in GOAWAY_MODES:
            raise KnobError(f"goaway must be one of {', '.join(GOAWAY_MODES)}")

    def without_faults(self) -> SimProfile:
        """The same model, healthy: no failure knob set."""
        return dataclasses.replace(
            self, fail_status=None, reset_after=None, kill_after=None, goaway=None,
            malformed_after=None,
        )

    # -- changing knobs -------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, str], *, per_request: bool) -> SimProfile:
        """A copy with knobs (by field name) parsed from text.

        ``per_request`` refuses the knobs that belong to the whole process
        (the concurrency limit, HTTP/2 settings): a request cannot change them.
        """
        if not overrides:
            return self
        changes: dict[str, Any] = {}
        for name, text in overrides.items():
            knob = KNOBS.get(name)
            if knob is None:
                raise KnobError(f"unknown sim knob {name!r}")
            if per_request and not knob.metadata["per_request"]:
                raise KnobError(f"sim knob {name!r} is set per process, not per request")
            try:
                changes[name] = knob.metadata["parse"](text)
            except ValueError as exc:
                raise KnobError(f"bad value {text!r} for sim knob {name!r}: {exc}") from exc
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], base: SimProfile | None = None) -> SimProfile:
        """``SIM_<KNOB>`` variables over ``base`` (default: the defaults)."""
        overrides = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in KNOBS
            if ENV_PREFIX + name.upper() in environ
        }
        return (base or cls()).with_overrides(overrides, per_request=False)


KNOBS: dict[str, dataclasses.Field[Any]] = {knob.name: knob for knob in dataclasses.fields(SimProfile)}

#: Request header name -> knob name (``x-sim-ttft-ms`` -> ``ttft_ms``).
HEADER_KNOBS: dict[str, str] = {
    knob.metadata["header"] or HEADER_PREFIX + name.replace("_", "-"): name
    for name, knob in KNOBS.items()
    if knob.metadata["per_request"]
}


def header_overrides(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The knobs set by ``x-sim-*`` headers (names already lower-case).

    An unknown ``x-sim-*`` header is an error rather than silently ignored:
    a typo in a test would otherwise pass as "the knob had no effect".
    """
    overrides: dict[str, str] = {}
    for name, value in headers:
        if not name.startswith(HEADER_PREFIX):
            continue
        knob = HEADER_KNOBS.get(name)
        if knob is None:
            raise KnobError(f"unknown sim header {name!r}")
        overrides[knob] = value
    return overrides


# Each item is whitespace then at least one other character: no two ways to
# split a run of spaces, so no catastrophic backtracking on hostile prompts.
_DIRECTIVE = re.compile(r"\[sim((?:\s+[^\s\]]+)*)\s*\]")


def directive_overrides(text: str) -> dict[str, str]:
    """The knobs set by ``[sim name=value ...]`` directives in a prompt text;
    a later directive wins over an earlier one."""
    overrides: dict[str, str] = {}
    if "[sim" not in text:  # the common case, without running the regex
        return overrides
    for match in _DIRECTIVE.finditer(text):
        for pair in match.group(1).split():
            name, sep, value = pair.partition("=")
            if not sep:
                raise KnobError(f"sim directive item {pair!r} is not name=value")
            overrides[name] = value
    return overrides


# -- command line ---------------------------------------------------------------


def add_knob_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ttft-ms`` etc., one flag per knob, all defaulting to "not given"."""
    group = parser.add_argument_group("model profile (also SIM_<KNOB> in the environment)")
    for name, knob in KNOBS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar="VALUE",
            default=None,
            help=f"{knob.metadata['help']} (default: {knob.default})",
        )


def profile_from_process(args: argparse.Namespace, environ: Mapping[str, str]) -> SimProfile:
    """Defaults, then the environment, then the flags."""
    from_env = SimProfile.from_env(environ)
    flags = {name: getattr(args, name) for name in KNOBS if getattr(args, name) is not None}
    return from_env.with_overrides(flags, per_request=False)
