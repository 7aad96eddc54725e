"""One model request, start to end: the script both protocols run.

Parse the provider's request, settle the knobs (process < header < prompt
directive), take a concurrency slot, then play the answer out on a schedule:
the first token at TTFT, each next one an inter-token latency later, every
gap jittered. Failures are injected at the point their knob names. The
request log records arrival, first token, end and outcome.

The schedule is absolute (deadline += gap), so a busy loop delays tokens but
never stretches the whole answer; a late stream catches up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Literal

from gateway.sim.content import (
    last_user_text,
    prompt_digest,
    prompt_token_count,
    tokens_from_digest,
)
from gateway.sim.formats import (
    AnswerExtras,
    CompletionRequest,
    FinishReason,
    Format,
    InvalidRequest,
    WireEncoder,
    error_body,
    make_encoder,
    parse_anthropic,
    parse_openai,
)
from gateway.sim.limiter import FifoLimiter
from gateway.sim.log import Record, RequestLog
from gateway.sim.profile import KnobError, SimProfile, directive_overrides, header_overrides
from gateway.sim.sink import Headers, PeerGone, ResponseSink, SimRequest, respond

_PARSERS: dict[Format, Callable[[bytes], CompletionRequest]] = {
    "openai": parse_openai,
    "anthropic": parse_anthropic,
}

STREAM_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

#: Without a sleep between tokens (itl_ms=0), yield to the loop this often so
#: one fast stream cannot starve the others.
_YIELD_EVERY = 32

#: The failures that strike after K tokens, named as their knobs.
Fault = Literal["reset_after", "kill_after", "malformed_after"]
#: When several name the same K, the first of these wins.
_FAULT_PRECEDENCE: tuple[Fault, ...] = ("reset_after", "kill_after", "malformed_after")

#: The non-streaming answer cut short by malformed_after.
_MALFORMED_JSON = b'{"malformed'


def request_profile(base: SimProfile, request: SimRequest, messages: list[dict[str, object]]) -> SimProfile:
    """The knobs for one request: the process's, then headers, then the
    prompt directive (the last user message's ``[sim name=value ...]``)."""
    overrides = header_overrides(request.headers.items())
    overrides.update(directive_overrides(last_user_text(messages)))
    return base.with_overrides(overrides, per_request=True)


async def serve_completion(
    format: Format,
    request: SimRequest,
    sink: ResponseSink,
    *,
    profile: SimProfile,
    log: RequestLog,
    limiter: FifoLimiter,
) -> None:
    record = log.open(
        path=request.path,
        format=format,
        http_version=sink.http_version,
        connection_id=sink.connection_id,
        authorization=request.has_credentials,
    )
    sink.track(record)
    try:
        await _serve(format, request, sink, record, profile, log, limiter)
    except PeerGone:
        log.finish(record, "disconnect")
    except asyncio.CancelledError:
        # The protocol usually ended the record already (reset/disconnect,
        # timed in its callback); this covers a server shutting down.
        log.finish(record, "disconnect")
        raise
    except Exception:
        log.finish(record, "failed")
        raise


async def _serve(
    format: Format,
    request: SimRequest,
    sink: ResponseSink,
    record: Record,
    base: SimProfile,
    log: RequestLog,
    limiter: FifoLimiter,
) -> None:
    try:
        completion = _PARSERS[format](request.body)
        profile = request_profile(base, request, completion.messages)
    except (InvalidRequest, KnobError) as exc:
        await _fail(sink, record, log, format, 400, str(exc))
        return
    if profile.fault_requests is not None and record.id > profile.fault_requests:
        profile = profile.without_faults()
    digest = prompt_digest(completion.messages)
    record.stream = completion.stream
    record.model = completion.model
    record.prompt_sha = digest.hex()

    if profile.goaway is not None:
        refuse = profile.goaway == "refuse"
        sink.goaway(refuse=refuse)
        if refuse:
            log.finish(record, "failed")
            return
    if profile.fail_status is not None:
        await _fail(
            sink, record, log, format, profile.fail_status,
            f"simulated failure (status {profile.fail_status})",
            retry_after_s=profile.retry_after_s,
        )
        return

    n_tokens = profile.tokens
    finish: FinishReason = "stop"
    if completion.max_tokens is not None and completion.max_tokens < n_tokens:
        n_tokens, finish = completion.max_tokens, "length"
    generation = _Generation(
        sink=sink,
        record=record,
        log=log,
        profile=profile,
        tokens=tokens_from_digest(digest, n_tokens, profile.token_size),
        finish=finish,
        encoder=make_encoder(
            completion,
            request_id=record.id,
            created=int(record.arrival_wall),
            prompt_tokens=prompt_token_count(completion.messages),
            extras=AnswerExtras(
                resolved_model=profile.resolved_model,
                fingerprint=profile.fingerprint,
                logprobs=profile.logprobs,
                refusal=profile.refusal,
                cached_tokens=profile.cached_tokens,
                reasoning_tokens=profile.reasoning_tokens,
            ),
        ),
    )
    # The queue wait counts before the TTFT: the schedule starts in the slot.
    async with limiter.slot():
        if completion.stream:
            await generation.stream()
        else:
            await generation.whole()


async def _fail(
    sink: ResponseSink,
    record: Record,
    log: RequestLog,
    format: Format,
    status: int,
    message: str,
    *,
    retry_after_s: int | None = None,
) -> None:
    headers = [("content-type", JSON_CONTENT_TYPE), ("x-sim-request-id", str(record.id))]
    if retry_after_s is not None and status in (429, 503):
        headers.append(("retry-after", str(retry_after_s)))
    record.status = status
    await respond(sink, status, headers, error_body(format, status, message))
    log.finish(record, "failed")


class _Generation:
    """The timed answer of one admitted request."""

    def __init__(
        self,
        *,
        sink: ResponseSink,
        record: Record,
        log: RequestLog,
        profile: SimProfile,
        tokens: list[str],
        finish: FinishReason,
        encoder: WireEncoder,
    ) -> None:
        self._sink = sink
        self._record = record
        self._log = log
        self._profile = profile
        self._tokens = tokens
        self._finish = finish
        self._encoder = encoder
        self._unslept = 0
        #: Token count -> the failure that strikes once that many were produced.
        self._faults: dict[int, Fault] = {}
        for fault in reversed(_FAULT_PRECEDENCE):
            if (after := getattr(profile, fault)) is not None:
                self._faults[after] = fault

    def _headers(self, content_type: str) -> Headers:
        headers = [("content-type", content_type), ("x-sim-request-id", str(self._record.id))]
        if content_type == STREAM_CONTENT_TYPE:
            headers.append(("cache-control", "no-cache"))
        return headers

    def _schedule(self) -> Iterator[float]:
        """Loop-clock deadlines of token 0, 1, 2, ..."""
        profile = self._profile
        rng = random.Random(profile.seed * 1_000_003 + self._record.id)

        def jittered(base_ms: float, jitter_ms: float) -> float:
            if jitter_ms:
                base_ms += rng.uniform(-jitter_ms, jitter_ms)
            return max(base_ms, 0.0) / 1000.0

        deadline = asyncio.get_running_loop().time() + jittered(profile.ttft_ms, profile.ttft_jitter_ms)
        while True:
            yield deadline
            deadline += jittered(profile.itl_ms, profile.itl_jitter_ms)

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            self._unslept = 0
            await asyncio.sleep(delay)
        else:
            self._unslept += 1
            if self._unslept >= _YIELD_EVERY:
                self._unslept = 0
                await asyncio.sleep(0)

    async def _send_head(self, status: int, headers: Headers, content_length: int | None = None) -> None:
        self._record.status = status
        await self._sink.send_head(status, headers, content_length=content_length)

    async def _inject(self, fault: Fault, malformed: bytes) -> None:
        # Logged before acting: the failure is ours, whatever the peer does next.
        self._log.finish(self._record, "failed")
        if fault == "reset_after":
            self._sink.reset()
        elif fault == "kill_after":
            self._sink.kill()
        else:
            await self._sink.finish(malformed)

    async def stream(self) -> None:
        sink, record, encoder = self._sink, self._record, self._encoder
        await self._send_head(200, self._headers(STREAM_CONTENT_TYPE))
        await sink.send(encoder.stream_open())
        faults = self._faults
        schedule = self._schedule()
        for sent, token in enumerate(self._tokens):
            await self._sleep_until(next(schedule))
            if faults and (fault := faults.get(sent)) is not None:
                await self._inject(fault, encoder.malformed())
                return
            await sink.send(encoder.token(token))
            record.tokens_sent = sent + 1
            if sent == 0:
                record.first_token = time.monotonic()
        if (fault := faults.get(len(self._tokens))) is not None:
            await self._inject(fault, encoder.malformed())
            return
        await sink.finish(encoder.stream_close(self._finish, len(self._tokens)))
        self._log.finish(record, "complete")

    async def whole(self) -> None:
        """Non-streaming: the same schedule, one body when the last token is due."""
        n_tokens = len(self._tokens)
        due = [sent for sent in self._faults if sent <= n_tokens]
        stop_at = min(due, default=n_tokens)
        fault = self._faults.get(stop_at) if due else None
        schedule = self._schedule()
        # A fault after K tokens strikes when token K is due; the answer is
        # complete when the last token is.
        for _ in range(max(min(stop_at, n_tokens - 1), 0)):
            next(schedule)
        await self._sleep_until(next(schedule))
        if fault is not None:
            if fault == "malformed_after":
                await self._send_head(200, self._headers(JSON_CONTENT_TYPE))
            await self._inject(fault, _MALFORMED_JSON)
            return
        body = self._encoder.message(self._tokens, self._finish, n_tokens)
        await self._send_head(200, self._headers(JSON_CONTENT_TYPE), len(body))
        self._record.first_token = time.monotonic()
        await self._sink.finish(body)
        self._record.tokens_sent = n_tokens
        self._log.finish(self._record, "complete")
