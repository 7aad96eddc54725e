"""Cancel latency: client abort -> the upstream stream's end, as the
simulator logs it, for one stream and for 500 aborted in a burst or spread
over time, through the gateway and through nginx (issue 9)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import aiohttp

from gateway.sim.content import prompt_digest
from tests.perf import procs
from tests.perf.client import chat_body, percentile
from tests.perf.common import fmt, session, sim_records, verdict, wait_records

#: Spread aborts: one every SPREAD_S / N seconds, the streams in a seeded random order.
SPREAD_S = 2.5
SPREAD_SEED = 9


async def cancel_latency(levels: tuple[int, ...] = (1, 500)) -> list[dict[str, Any]]:
    """Client abort -> the simulator logs the reset, per level: one stream
    alone, then N streams aborted all at once (``burst``) and one at a time
    while the others keep streaming (``spread``)."""
    rows = []
    # Slow tokens (2 per second per stream): the figure is the cancel path,
    # not a gateway saturated by 500 streams' relay work.
    # 2,000 tokens: 1,000 s of stream, far longer than a row; the simulator
    # draws each answer whole when the request comes, so 100,000 tokens for
    # 500 streams took it seconds of CPU and gigabytes, enough to time out a
    # connection the gateway opened meanwhile.
    knobs = {"ttft_ms": 20, "ttft_jitter_ms": 0, "itl_ms": 500, "itl_jitter_ms": 0, "tokens": 2_000,
             "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, session() as http:
        sim_url = systems["sim"].url
        for level in levels:
            for pattern in ("burst", "spread") if level > 1 else ("single",):
                # nginx, the reference, closes its upstream connection when
                # its client goes: the same moment, seen by the simulator.
                for name in ("gateway", "nginx"):
                    if name in systems:
                        url = systems[name].url + "/v1/chat/completions"
                        row = await _cancel_row(http, sim_url, url, level, pattern)
                        rows.append({"system": name, **row})
    return rows


async def _cancel_row(
    http: aiohttp.ClientSession, sim_url: str, url: str, level: int, pattern: str
) -> dict[str, Any]:
    async with http.delete(sim_url + "/admin/requests"):
        pass
    prompts = [f"cancel {pattern} {level} {i} {time.time_ns()}" for i in range(level)]
    keys = [prompt_digest([{"role": "user", "content": p}]).hex() for p in prompts]
    opened = await _open_streams(http, url, prompts)
    # A stream that ended before its first token is neither aborted nor
    # measured: the row's `measured` count shows it.
    live = [(response, key) for response, key in zip(opened, keys, strict=True) if response is not None]
    closed: dict[str, float] = {}
    if pattern == "spread":
        await _abort_spread(live, closed)
    else:
        for response, key in live:
            _abort(response, key, closed)
    await wait_records(http, sim_url, len(live))
    latencies = [
        (record["end"] - closed[record["prompt_sha"]]) * 1000
        for record in await sim_records(http, sim_url)
        if record["prompt_sha"] in closed and record["end"] is not None
    ]
    return {"streams": level, "pattern": pattern, "measured": len(latencies),
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "max": max(latencies, default=None)}


async def _open_streams(
    http: aiohttp.ClientSession, url: str, prompts: list[str]
) -> list[aiohttp.ClientResponse | None]:
    """One stream per prompt, each mid-stream (its first content read) before
    any is aborted; None for one that ended first (an in-stream error)."""
    responses = [await http.post(url, json=chat_body(p)).__aenter__() for p in prompts]
    streaming: list[aiohttp.ClientResponse | None] = []
    for response in responses:
        while b'"content":"' not in (chunk := await response.content.readany()):
            if not chunk:
                response.close()
                break
        streaming.append(response if chunk else None)
    return streaming


async def _abort_spread(
    streams: list[tuple[aiohttp.ClientResponse, str]], closed: dict[str, float]
) -> None:
    """Every client keeps reading its stream until its own moment, then
    aborts: one abort every SPREAD_S / N seconds, the streams in a seeded
    random order, the others streaming on meanwhile."""
    order = list(streams)
    random.Random(SPREAD_SEED).shuffle(order)
    gap = SPREAD_S / len(order)
    start = asyncio.get_running_loop().time()
    async with asyncio.TaskGroup() as group:
        for slot, (response, key) in enumerate(order):
            group.create_task(_read_then_abort(response, start + (slot + 1) * gap, key, closed))


async def _read_then_abort(
    response: aiohttp.ClientResponse, at: float, key: str, closed: dict[str, float]
) -> None:
    try:
        async with asyncio.timeout_at(at):
            async for _ in response.content.iter_any():
                pass
    except TimeoutError:
        _abort(response, key, closed)
    # A stream that ended by itself before its moment is not stamped: the
    # row's `measured` count shows it.


def _abort(response: aiohttp.ClientResponse, key: str, closed: dict[str, float]) -> None:
    """Abort a stream now, stamping ``closed[key]`` at that moment.

    ``response.close()`` alone only schedules the socket's close: asyncio's
    transport.close() queues it (call_soon) for the loop's next iteration,
    after whatever else this one does (in a burst, aborting every other
    stream), and a stamp taken after it can be late by a preemption (the
    woken system may run before the load generator stamps). So the FIN goes
    out here, synchronously (shutdown), stamped just before; the close that
    follows only tidies up.
    """
    assert response.connection is not None and response.connection.transport is not None
    sock = response.connection.transport.get_extra_info("socket")
    closed[key] = time.monotonic()
    sock.shutdown(socket.SHUT_RDWR)
    response.close()


async def section(levels: tuple[int, ...]) -> list[str]:
    streams = max(levels)
    out = [
        "", "### Cancel latency (client abort -> simulator logs the reset)", "",
        "From the client's abort to the simulator logging the end of the upstream stream (the "
        "gateway's RST_STREAM; both clocks CLOCK_MONOTONIC, one machine); slow tokens (2 per "
        "second per stream), so the figure is the cancel path. The client stamps the moment "
        "and sends its FIN at once (`shutdown`); aiohttp's `response.close()` alone would only "
        "schedule the socket's close for the loop's next iteration, after the load generator's "
        "other work (in a burst, all its other aborts).", "",
        f"- **burst**: all {streams} streams aborted in one go: the worst case, the gateway "
        "handling every disconnect at once.",
        f"- **spread**: {streams} streams open and streaming; the clients abort one at a time, "
        f"one every {SPREAD_S * 1000 / streams:.0f} ms over {SPREAD_S:.1f} s in a seeded random "
        "order, while the rest keep streaming: cancel latency at "
        f"{streams} streams as a user experiences it, so this is the row compared with the "
        "target (p95 <= 5 ms at 500 streams).", "",
        "nginx (the reference) relays the same streams over HTTP/1.1 and closes its upstream "
        "connection when its client goes.", "",
        "| streams | abort pattern | system | measured | p50 (ms) | p95 (ms) | max (ms) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    rows = await cancel_latency(levels)
    for row in rows:
        out.append(f"| {row['streams']} | {row['pattern']} | {row['system']} "
                   f"| {row['measured']}/{row['streams']} "
                   f"| {fmt(row['p50'], 2)} | {fmt(row['p95'], 2)} | {fmt(row['max'], 2)} |")
    at_500 = {row["pattern"]: row["p95"] for row in rows
              if row["streams"] == 500 and row["system"] == "gateway"}
    if at_500:
        out += ["", f"At 500 streams, spread: cancel latency p95 **{fmt(at_500.get('spread'), 2)} ms** "
                f"(target <= 5 ms: {verdict(at_500.get('spread'), 5.0)}); burst, the worst case: "
                f"{fmt(at_500.get('burst'), 2)} ms."]
    return out
