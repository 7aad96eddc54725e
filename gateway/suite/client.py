"""The suite's streaming client: one chat completion, timed as benchmarks time it.

TTFT runs from just before the request is sent to the arrival of the first
non-empty content delta (AIPerf, LLMPerf, sglang, GuideLLM); time to first
byte is the first *body* byte (the gateway's ``: ping``, the simulator's role
chunk): what makes a proxy or load balancer see the stream alive. ITL is the
gap between consecutive content deltas (0 when two arrive in one read), and
end-to-end ends at ``data: [DONE]``. Whatever waits before the request is
sent (an open-loop arrival held back by the concurrency cap) is not TTFT.

Comments are kept, unlike in an SDK: the gateway's ``: meta {...}`` record
carries its own view of the request (role, queue wait). An abort closes the
connection the way a browser tab does, and its time is taken just before.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

#: What the suite's requests ask for when the caller names no model.
DEFAULT_MODEL = "sim-1"


@dataclass(frozen=True, slots=True)
class Abort:
    """When the client gives up on its stream (None: it never does)."""

    #: After this many content deltas arrived (mid-stream).
    after_tokens: int | None = None
    #: This long after the first byte, if no content arrived by then
    #: (before the first token: the upstream is still thinking).
    after_first_byte_s: float | None = None


@dataclass(slots=True)
class StreamResult:
    """One request's timings (``time.monotonic()``), text and fate."""

    label: str
    sent: float
    status: int = 0
    first_byte: float | None = None
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    #: The gateway's ``: meta {...}`` record, when one came.
    meta: dict[str, Any] | None = None
    #: Why the request failed (None: it did not).
    error: str | None = None
    #: When the client closed the connection on purpose.
    aborted_at: float | None = None
    done: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.done

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.sent) * 1000

    @property
    def ttfb_ms(self) -> float | None:
        return None if self.first_byte is None else (self.first_byte - self.sent) * 1000

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end is None or not self.done else (self.end - self.sent) * 1000

    def itl_ms(self) -> list[float]:
        times = self.token_times
        return [(later - earlier) * 1000 for earlier, later in zip(times, times[1:], strict=False)]

    @property
    def queue_wait_ms(self) -> float | None:
        value = None if self.meta is None else self.meta.get("queue_wait_ms")
        return float(value) if isinstance(value, int | float) else None


def chat_body(
    prompt: str, *, model: str = DEFAULT_MODEL, max_tokens: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class _EventReader:
    """Splits body bytes into SSE lines and dispatches events (WHATWG HTML
    §9.2.6: a blank line ends an event; ``:`` starts a comment)."""

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """``("comment", text)`` and ``("data", text)`` items completed by ``chunk``."""
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        items: list[tuple[str, str]] = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data:
                    items.append(("data", "\n".join(self._data)))
                    self._data = []
            elif line.startswith(":"):
                items.append(("comment", line[1:].lstrip(" ")))
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return items


def _apply(result: StreamResult, kind: str, value: str, now: float) -> None:
    """One SSE item into the result."""
    if kind == "comment":
        if value.startswith("meta ") and result.meta is None:
            meta = json.loads(value[5:])
            result.meta = meta if isinstance(meta, dict) else None
        return
    if value == "[DONE]":
        result.done = True
        return
    payload = json.loads(value)
    if not isinstance(payload, dict):
        raise ValueError("a data frame that is not a JSON object")
    if "error" in payload:
        error = payload["error"]
        code = error.get("code") if isinstance(error, dict) else None
        result.error = f"in-stream error: {code or error}"
        return
    for choice in payload.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            if result.first_token is None:
                result.first_token = now
            result.token_times.append(now)
            result.text_parts.append(content)


async def stream_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    label: str = "",
    api_key: str | None = None,
    abort: Abort | None = None,
    timeout_s: float = 60.0,
) -> StreamResult:
    """POST ``body`` to ``url`` (``.../chat/completions``) and time the stream.

    Never raises for the request's own failures: they land in ``error``.
    """
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    result = StreamResult(label=label, sent=time.monotonic())
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body, headers=headers) as response:
                result.status = response.status
                if response.status != 200:
                    result.error = f"HTTP {response.status}"
                    await response.read()
                    return result
                await _read_stream(response, result, abort or Abort())
        if result.aborted_at is None and result.error is None and not result.done:
            result.error = "stream ended without [DONE]"
    except TimeoutError:
        result.error = f"no answer within {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValueError as exc:  # a frame that is not JSON
        result.error = f"malformed stream: {exc}"
    return result


async def _read_stream(response: aiohttp.ClientResponse, result: StreamResult, abort: Abort) -> None:
    reader = _EventReader()
    loop = asyncio.get_running_loop()
    try:
        # The abort deadline is armed by the first byte; until then, none.
        async with asyncio.timeout(None) as abort_deadline:
            async for chunk in response.content.iter_any():
                now = time.monotonic()
                if result.first_byte is None:
                    result.first_byte = now
                    if abort.after_first_byte_s is not None:
                        abort_deadline.reschedule(loop.time() + abort.after_first_byte_s)
                for kind, value in reader.feed(chunk):
                    _apply(result, kind, value, now)
                if result.first_token is not None:
                    abort_deadline.reschedule(None)  # a token came: not a pre-token abort
                if abort.after_tokens is not None and len(result.token_times) >= abort.after_tokens:
                    _abort(response, result)
                    return
                if result.done or result.error is not None:
                    break
        result.end = time.monotonic()
    except TimeoutError:
        if not abort_deadline.expired():
            raise
        _abort(response, result)


def _abort(response: aiohttp.ClientResponse, result: StreamResult) -> None:
    # The time first, then the close: the latency we measure from here must
    # not include our own teardown.
    result.aborted_at = time.monotonic()
    response.close()
