"""The soak: the gateway as a process under steady mixed load for minutes,
over each upstream protocol, with client aborts and injected upstream
faults. It reports the failures that were not injected (the figure that must
be 0), the gateway's RSS growth per 10,000 requests and its open descriptors
before and after.

The mix, per request (seeded, so two runs draw the same sequence): mostly
streams (OpenAI and native), some non-streaming, some shared prompts (a
coalesced burst), client aborts after a few chunks, and per-stream upstream
faults injected by simulator directives (an error status, a stream reset,
a malformed chunk). A fault that takes a whole connection (``kill_after``)
is left out: over HTTP/2 it would fail the other streams on it too, which is
not a per-request injection.

``python -m tests.perf.bench_soak --seconds 30`` is a smoke run; ``make
bench`` runs it for 5 minutes a protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.perf import procs
from tests.perf.common import session

CONCURRENCY = 30
#: Per-stream faults the simulator injects, and the error codes they end with.
FAULTS = {
    "fail_status=500": ("upstream_500", "server_error", "upstream_error"),
    "fail_status=429": ("rate_limit_exceeded", "upstream_429"),
    "reset_after=3": ("upstream_stream_reset", "upstream_connection_lost"),
    "malformed_after=3": ("upstream_protocol_error",),
}
SIM = "ttft_ms=20 itl_ms=3 tokens=24"
#: RSS growth is counted from this request on (when a run gets that far).
WARM_REQUESTS = 2_000


@dataclass
class SoakResult:
    protocol: str
    seconds: float
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (requests so far, RSS)
    fds_before: int = 0
    fds_after: int = 0

    @property
    def rss_per_10k_kib(self) -> float | None:
        if len(self.rss_kib) < 2 or self.rss_kib[-1][0] == self.rss_kib[0][0]:
            return None
        (n0, r0), (n1, r1) = self.rss_kib[0], self.rss_kib[-1]
        return (r1 - r0) / (n1 - n0) * 10_000


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def _one(http: aiohttp.ClientSession, base: str, rng: random.Random, n: int) -> str:
    """One request of the mix; returns its outcome class, or raises
    AssertionError naming what was not expected."""
    roll = rng.random()
    fault = rng.choice(list(FAULTS)) if roll < 0.06 else None
    abort = 0.06 <= roll < 0.12
    shared = 0.12 <= roll < 0.20
    stream = roll >= 0.20 or abort or fault is not None
    # /v1/stream always streams: the non-streaming calls go to the OpenAI API.
    path = "/v1/stream" if stream and rng.random() < 0.3 else "/v1/chat/completions"
    prompt = f"soak {'shared ' + str(n // 50) if shared else n} [sim {SIM}{' ' + fault if fault else ''}]"
    body = {"model": "sim", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    async with http.post(base + path, json=body) as resp:
        if not stream:
            payload = await resp.json()
            assert resp.status == 200 and payload["choices"][0]["message"]["content"], payload
            return "ok"
        assert resp.status == 200, resp.status
        if abort:
            chunks = 0
            async for _ in resp.content.iter_any():
                chunks += 1
                if chunks >= 3:
                    break
            resp.close()
            return "aborted"
        raw = await resp.read()
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if fault is not None:
        assert any(code.encode() in last for code in FAULTS[fault]), (fault, last[-300:])
        assert b"[DONE]" not in raw and b"event: done" not in raw
        return "injected"
    if path.endswith("/completions"):
        assert last == b"data: [DONE]", last[-300:]
    else:
        assert last.startswith(b"event: done"), last[-300:]
    return "ok"


async def soak(protocol: str, seconds: float, *, seed: int = 17) -> SoakResult:
    result = SoakResult(protocol, seconds)
    async with procs.systems(
        with_nginx=False,
        gateway_env={"UPSTREAM_PROTOCOL": protocol, "ERROR_TTL_MS": "0"},
    ) as systems:
        gateway = systems["gateway"]
        rng = random.Random(seed)
        counter = 0
        async with session() as http:
            # Warm up (pools, caches) before the first figures.
            for n in range(50):
                await _one(http, gateway.url, random.Random(n), -n - 1)
            result.fds_before = _fds(gateway.pid)
            result.rss_kib.append((0, gateway.rss_kib()))
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                nonlocal counter
                while time.monotonic() < deadline:
                    counter += 1
                    n = counter
                    try:
                        outcome = await _one(http, gateway.url, random.Random(rng.random()), n)
                    except (AssertionError, aiohttp.ClientError, ValueError) as exc:
                        outcome = "unexpected"
                        if len(result.unexpected) < 20:
                            result.unexpected.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    result.outcomes[outcome] += 1
                    if n == WARM_REQUESTS:
                        # Growth is counted from here: the first requests fill
                        # pools, caches and tables that then stay.
                        result.rss_kib[:] = [(n, gateway.rss_kib())]
                    elif n % 10_000 == 0:
                        result.rss_kib.append((n, gateway.rss_kib()))

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            result.requests = counter
            await asyncio.sleep(1.0)  # aborted streams' cleanup settles
            result.rss_kib.append((counter, gateway.rss_kib()))
        # Every client connection of ours is closed now (the session is).
        await asyncio.sleep(0.5)
        result.fds_after = _fds(gateway.pid)
    return result


async def idle_connections_cost(count: int = 2_000) -> tuple[int, int]:
    """The gateway's RSS (KiB) before and with ``count`` idle kept-alive
    client connections, each after one answered request."""
    async with procs.systems(with_nginx=False) as systems:
        gateway = systems["gateway"]
        port = int(gateway.url.rsplit(":", 1)[1])
        held: list[asyncio.StreamWriter] = []
        before = gateway.rss_kib()
        try:
            for _ in range(count):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")
                await reader.readuntil(b'"ok"}')
                held.append(writer)
            await asyncio.sleep(0.5)
            return before, gateway.rss_kib()
        finally:
            for writer in held:
                writer.close()


def _lines(results: list[SoakResult]) -> list[str]:
    out = [
        "### Soak (mixed load, aborts and injected faults)", "",
        f"{CONCURRENCY} concurrent clients for the whole run, per upstream protocol; each request "
        "is a stream (OpenAI or native), a non-streaming call, a shared prompt, a client abort "
        "after 3 chunks, or a stream with an injected upstream fault (500, 429, reset, malformed "
        f"chunk). `not injected` must be 0. RSS growth counts from the {WARM_REQUESTS:,}th request. "
        "Descriptors are the gateway's own, after every client connection closed; over HTTP/1.1 "
        "they include the idle upstream connections its pool keeps.", "",
        "| protocol | seconds | requests | ok | aborted | injected | not injected | RSS start -> "
        "end (MiB) | RSS per 10k requests (KiB) | fds before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        per_10k = r.rss_per_10k_kib
        out.append(
            f"| {r.protocol} | {r.seconds:.0f} | {r.requests:,} | {r.outcomes['ok']:,} "
            f"| {r.outcomes['aborted']:,} | {r.outcomes['injected']:,} "
            f"| {r.outcomes['unexpected']:,} "
            f"| {r.rss_kib[0][1] / 1024:.1f} -> {r.rss_kib[-1][1] / 1024:.1f} "
            f"| {'n/a' if per_10k is None else f'{per_10k:,.0f}'} "
            f"| {r.fds_before} / {r.fds_after} |"
        )
    for r in results:
        for line in r.unexpected:
            out.append(f"- {r.protocol}: {line}")
    return out


async def section(seconds: float) -> list[str]:
    results = [await soak(protocol, seconds) for protocol in ("h2c", "http1")]
    before, after = await idle_connections_cost()
    return _lines(results) + [
        "", f"2,000 idle kept-alive client connections (one answered request each): gateway RSS "
        f"{before / 1024:.1f} -> {after / 1024:.1f} MiB ({(after - before) / 2_000:.2f} KiB each).",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.perf.bench_soak")
    parser.add_argument("--seconds", type=float, default=300.0, help="per protocol")
    args = parser.parse_args()
    print("\n".join(asyncio.run(section(args.seconds))))
