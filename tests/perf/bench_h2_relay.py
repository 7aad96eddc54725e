"""Chunks per second through one HTTP/2 connection, relayed by our client.

The simulator (its own process, its own core) streams tokens with no
inter-token delay; the pooled h2 client in this process reads them on one
connection and decodes every one into a Delta -- the path an actor runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from gateway.upstream.base import UpstreamRequest
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.providers import get_provider
from tests.integration.h2_pools import h2_pool
from tests.perf import procs


def _request(prompt: str) -> UpstreamRequest:
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    return UpstreamRequest(
        "POST", "/v1/chat/completions", (("content-type", "application/json"),), json.dumps(body).encode()
    )


async def _relay(pool: H2Pool, prompt: str) -> int:
    stream = await pool.open(_request(prompt))
    decoder = get_provider("openai").decoder()
    deltas = 0
    while data := await stream.read():
        deltas += sum(1 for d in decoder.feed(data) if d.text)
    return deltas


async def bench_h2_relay(streams: int = 50, tokens: int = 2000) -> dict[str, float]:
    cores = sorted(os.sched_getaffinity(0))
    async with procs.simulator(
        core=cores[-1] if len(cores) > 1 else None,
        ttft_ms=0, ttft_jitter_ms=0, itl_ms=0, itl_jitter_ms=0, tokens=tokens,
    ) as sim:
        pool = h2_pool(sim.url + "/v1", max_connections=1)
        try:
            await _relay(pool, "warm up")
            cpu_before = time.process_time()
            started = time.perf_counter()
            counts = await asyncio.gather(*(_relay(pool, f"relay {i}") for i in range(streams)))
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_before
            assert pool.connection_count() == 1
        finally:
            await pool.aclose()
    chunks = sum(counts)
    assert chunks == streams * tokens, (chunks, streams * tokens)
    return {
        "streams": streams,
        "chunks": chunks,
        "chunks_per_s": chunks / elapsed,
        "client_cpu_us_per_chunk": cpu / chunks * 1e6,
    }


async def report() -> str:
    result = await bench_h2_relay()
    return "\n".join(
        [
            "## HTTP/2 client relay (issue 2)",
            "",
            "One h2 connection, the simulator streaming with no delay in its own process; the",
            "client reads and decodes every chunk into a Delta (what an actor does).",
            "",
            "| streams | chunks | chunks/s | client CPU per chunk |",
            "|---:|---:|---:|---:|",
            f"| {result['streams']:.0f} | {result['chunks']:.0f} | {result['chunks_per_s']:,.0f} "
            f"| {result['client_cpu_us_per_chunk']:.1f} µs |",
            "",
            "The simulator (pure-Python h2, one core) is the ceiling here: it writes ~45-55k",
            "frames/s; the client's CPU per chunk is the figure that belongs to the gateway.",
        ]
    )


if __name__ == "__main__":
    print(asyncio.run(report()))
