"""The load generator's streaming client: timings as LLM benchmarks take them.

TTFT runs from just before the request is sent to the first non-empty content
delta (AIPerf, LLMPerf, GuideLLM); first byte is recorded separately. The
content test is a byte search, not a JSON parse: the generator must stay cheap
next to the systems it measures, and every system here (the simulator, the
gateway, nginx relaying the simulator) writes compact JSON.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.metrics import percentile

__all__ = ["Timing", "chat_body", "percentile", "timed_stream"]

_CONTENT = re.compile(rb'"content":"[^"]')


@dataclass
class Timing:
    sent: float
    first_byte: float | None = None
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.sent) * 1000

    def itl_ms(self) -> list[float]:
        times = self.token_times
        return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]


def chat_body(prompt: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "sim", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


async def timed_stream(
    session: aiohttp.ClientSession, url: str, prompt: str, *, record_tokens: bool = False
) -> Timing:
    timing = Timing(sent=time.monotonic())
    try:
        async with session.post(url, json=chat_body(prompt)) as response:
            if response.status != 200:
                timing.error = f"HTTP {response.status}"
                return timing
            async for chunk in response.content.iter_any():
                now = time.monotonic()
                if timing.first_byte is None:
                    timing.first_byte = now
                hits = len(_CONTENT.findall(chunk)) if record_tokens or timing.first_token is None else 0
                if hits and timing.first_token is None:
                    timing.first_token = now
                if record_tokens:
                    timing.token_times.extend([now] * hits)
            timing.end = time.monotonic()
    except aiohttp.ClientError as exc:
        timing.error = type(exc).__name__
    return timing
