"""The load generator's streaming client: timings as LLM benchmarks take them.

TTFT runs from just before the request is sent to the first non-empty content
delta (AIPerf, LLMPerf, GuideLLM); first byte is recorded separately. The
content test is a byte search, not a JSON parse: the generator must stay cheap
next to the systems it measures, and every system here (the simulator, the
gateway, nginx relaying the simulator) writes compact JSON.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.metrics import percentile

__all__ = ["Timing", "chat_body", "percentile", "steady_load", "timed_stream"]

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


class _Steady:
    """What the clients of one ``steady_load`` share: how many have yet to
    start, how many still have timed requests to make."""

    def __init__(self, clients: int) -> None:
        self.not_started = clients
        self.still_timing = clients

    @property
    def all_running(self) -> bool:
        return self.not_started == 0

    @property
    def all_timed(self) -> bool:
        return self.still_timing == 0


async def steady_load(
    session: aiohttp.ClientSession, url: str, prompt: str, *, clients: int, cycle_s: float, per_client: int
) -> list[Timing]:
    """``clients`` closed-loop clients, so that many streams are open at any
    moment, their arrivals spread out as many users' are: client i sends its
    first request at i * cycle_s / clients (``cycle_s`` about one stream's
    duration) and each next one as soon as the previous ends.

    Each client times ``per_client`` requests, all taken at full load: those
    sent before the last client has started would see fewer streams, so they
    are not timed; and a client that has its quota keeps sending (untimed)
    until every client has its own, so the last timed ones do not see the
    load drain away.
    """
    state = _Steady(clients)
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(_closed_loop(
                session, url, f"{prompt} {i}", i * cycle_s / clients, per_client, state
            ))
            for i in range(clients)
        ]
    return [timing for task in tasks for timing in task.result()]


async def _closed_loop(
    session: aiohttp.ClientSession, url: str, prompt: str, delay_s: float, quota: int, state: _Steady
) -> list[Timing]:
    await asyncio.sleep(delay_s)  # this client's place in the stagger: the load's shape, not a wait
    state.not_started -= 1
    timed: list[Timing] = []
    sent = 0
    while len(timed) < quota or not state.all_timed:
        counts = state.all_running and len(timed) < quota
        timing = await timed_stream(session, url, f"{prompt} {sent}")
        sent += 1
        if counts:
            timed.append(timing)
            if len(timed) == quota:
                state.still_timing -= 1
    return timed
