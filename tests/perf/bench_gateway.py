"""The gateway against the reference: TTFT overhead, cancel latency, memory,
relay throughput and fan-out over real sockets (issue 9).

Each system runs in its own process (simulator on one core, the gateway or
nginx on the other); this process is the load generator. Systems are
interleaved round by round within one run, so the machine's noise falls on
all of them alike and the ratios are comparable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.sim.content import prompt_digest
from tests.perf import procs
from tests.perf.client import chat_body, percentile, timed_stream

SIM_TTFT_MS = 300  # the peers' figures in issue 9 were taken at this TTFT


def _session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -- TTFT overhead ------------------------------------------------------------------


async def ttft_overhead(levels: tuple[int, ...] = (1, 50, 200, 1000)) -> list[dict[str, Any]]:
    rows = []
    knobs = {"ttft_ms": SIM_TTFT_MS, "ttft_jitter_ms": 0, "itl_ms": 10, "itl_jitter_ms": 0,
             "tokens": 8, "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, _session() as http:
        targets = {name: proc.url + "/v1/chat/completions" for name, proc in systems.items()
                   if name != "sim"}
        targets["direct"] = systems["sim"].url + "/v1/chat/completions"
        for level in levels:
            rounds = max(2, min(30, 600 // level))
            samples: dict[str, list[float]] = {name: [] for name in targets}
            errors = dict.fromkeys(targets, 0)
            for round_no in range(rounds + 1):  # round 0 warms connections up
                for name, url in targets.items():
                    timings = await asyncio.gather(*(
                        timed_stream(http, url, f"{name} {level} {round_no} {i} {time.time_ns()}")
                        for i in range(level)
                    ))
                    if round_no == 0:
                        continue
                    for t in timings:
                        if t.ttft_ms is None:
                            errors[name] += 1
                        else:
                            samples[name].append(t.ttft_ms)
            row: dict[str, Any] = {"concurrency": level, "samples": len(samples["direct"])}
            for name, values in samples.items():
                for q in (50, 95, 99):
                    row[f"{name}_p{q}"] = percentile(values, q)
                row[f"{name}_errors"] = errors[name]
            rows.append(row)
    return rows


def _overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| streams | samples | direct p50/p95/p99 (ms) | gateway overhead p50/p95/p99 (ms) "
        "| nginx overhead p50/p95/p99 (ms) | errors gw/nginx |",
        "|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        def over(name: str, row: dict[str, Any] = row) -> str:
            if row.get(f"{name}_p50") is None:
                return "n/a"
            return "/".join(_fmt(row[f"{name}_p{q}"] - row[f"direct_p{q}"]) for q in (50, 95, 99))

        direct = "/".join(_fmt(row[f"direct_p{q}"]) for q in (50, 95, 99))
        lines.append(
            f"| {row['concurrency']} | {row['samples']} | {direct} | {over('gateway')} | {over('nginx')} "
            f"| {row.get('gateway_errors', 0)}/{row.get('nginx_errors', 'n/a')} |"
        )
    return lines


# -- cancel latency -----------------------------------------------------------------


async def _sim_records(http: aiohttp.ClientSession, sim_url: str) -> list[dict[str, Any]]:
    async with http.get(sim_url + "/admin/requests") as response:
        return list((await response.json())["requests"])


async def _wait_records(
    http: aiohttp.ClientSession, sim_url: str, count: int, outcome: str | None = None
) -> None:
    query = f"count={count}&timeout_ms=20000" + (f"&outcome={outcome}" if outcome else "")
    async with http.get(sim_url + "/admin/requests/wait?" + query) as response:
        assert response.status == 200, f"simulator log did not reach {count} {outcome or ''}"


async def _wait_arrivals(http: aiohttp.ClientSession, sim_url: str, count: int) -> None:
    """Until the simulator has seen ``count`` requests (ended or not). The
    admin wait endpoint counts ended ones only, so this polls (a benchmark
    set-up step, not a measurement)."""
    async with asyncio.timeout(60):
        while len(await _sim_records(http, sim_url)) < count:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.05)


async def cancel_latency(levels: tuple[int, ...] = (1, 500)) -> list[dict[str, Any]]:
    rows = []
    # Slow tokens (2 per second per stream): the figure is the cancel path,
    # not a gateway saturated by 500 streams' relay work.
    knobs = {"ttft_ms": 20, "ttft_jitter_ms": 0, "itl_ms": 500, "itl_jitter_ms": 0, "tokens": 100_000,
             "max_concurrent_streams": 5000}
    async with procs.systems(with_nginx=False, sim_knobs=knobs) as systems, _session() as http:
        sim_url, url = systems["sim"].url, systems["gateway"].url + "/v1/chat/completions"
        for level in levels:
            async with http.delete(sim_url + "/admin/requests"):
                pass
            prompts = [f"cancel {level} {i} {time.time_ns()}" for i in range(level)]
            responses = [await http.post(url, json=chat_body(p)).__aenter__() for p in prompts]
            # Mid-stream: every client has its first content before anyone aborts.
            for response in responses:
                while b'"content":"' not in await response.content.readany():
                    pass
            aborted: dict[str, float] = {}
            for prompt, response in zip(prompts, responses, strict=True):
                aborted[prompt_digest([{"role": "user", "content": prompt}]).hex()] = time.monotonic()
                response.close()
            await _wait_records(http, sim_url, level)
            latencies = [
                (record["end"] - aborted[record["prompt_sha"]]) * 1000
                for record in await _sim_records(http, sim_url)
                if record["prompt_sha"] in aborted and record["end"] is not None
            ]
            rows.append({"streams": level, "measured": len(latencies),
                         "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                         "max": max(latencies)})
    return rows


# -- memory per idle stream -----------------------------------------------------------


async def idle_memory(streams: int = 10_000) -> dict[str, Any]:
    knobs = {"ttft_ms": 600_000, "ttft_jitter_ms": 0, "tokens": 4, "max_concurrent_streams": 20_000}
    env = {"upstream_max_connections": 4, "ping_interval_s": 600}
    async with procs.systems(with_nginx=False, sim_knobs=knobs, gateway_env=env) as systems:
        gateway, sim_url = systems["gateway"], systems["sim"].url
        url = gateway.url + "/v1/chat/completions"
        async with _session() as http:
            # Warm-up: code paths, pools, one upstream connection per slot.
            warm = [await http.post(url, json=chat_body(f"warm {i}")).__aenter__() for i in range(50)]
            for response in warm:
                await response.content.readany()
                response.close()
            await asyncio.sleep(0.5)  # let the gateway finish its cleanups before the baseline
            baseline = gateway.rss_kib()
            responses = []
            for start in range(0, streams, 500):
                batch = await asyncio.gather(*(
                    http.post(url, json=chat_body(f"idle {i} {time.time_ns()}")).__aenter__()
                    for i in range(start, min(streams, start + 500))
                ))
                for response in batch:
                    assert (await response.content.readany()).startswith(b": ping")
                responses.extend(batch)
            await _wait_arrivals(http, sim_url, streams + len(warm))
            loaded = gateway.rss_kib()
            for response in responses:
                response.close()
    return {"streams": streams, "baseline_mib": baseline / 1024, "loaded_mib": loaded / 1024,
            "kib_per_stream": (loaded - baseline) / streams}


# -- relay throughput -------------------------------------------------------------------


async def relay_throughput(stream_counts: tuple[int, ...] = (50, 100, 200, 400)) -> list[dict[str, Any]]:
    rows = []
    itl_ms, tokens = 10, 150
    knobs = {"ttft_ms": 20, "ttft_jitter_ms": 0, "itl_ms": itl_ms, "itl_jitter_ms": 0,
             "tokens": tokens, "max_concurrent_streams": 5000}
    async with procs.systems(with_nginx=False, sim_knobs=knobs) as systems, _session() as http:
        gateway = systems["gateway"]
        targets = {"direct": systems["sim"].url, "gateway": gateway.url}
        for count in stream_counts:
            row: dict[str, Any] = {"streams": count, "offered_chunks_per_s": count * 1000 / itl_ms}
            for name, base in targets.items():
                cpu_before = gateway.cpu_seconds()
                started = time.monotonic()
                timings = await asyncio.gather(*(
                    timed_stream(http, base + "/v1/chat/completions", f"relay {name} {count} {i} "
                                 f"{time.time_ns()}", record_tokens=True)
                    for i in range(count)
                ))
                elapsed = time.monotonic() - started
                chunks = sum(len(t.token_times) for t in timings)
                itl = [gap for t in timings for gap in t.itl_ms()[5:]]
                row[f"{name}_itl_p95"] = percentile(itl, 95)
                row[f"{name}_chunks_per_s"] = chunks / elapsed
                if name == "gateway":
                    row["gateway_cpu_s_per_1000"] = (gateway.cpu_seconds() - cpu_before) / chunks * 1000
            row["added_itl_p95"] = row["gateway_itl_p95"] - row["direct_itl_p95"]
            rows.append(row)
    return rows


# -- fan-out over sockets -----------------------------------------------------------------


async def fanout_sockets(subscribers: int = 10_000, tokens: int = 20) -> dict[str, Any]:
    knobs = {"ttft_ms": 600_000, "ttft_jitter_ms": 0, "itl_ms": 50, "itl_jitter_ms": 0,
             "tokens": tokens}
    async with procs.systems(with_nginx=False, sim_knobs=knobs) as systems, _session() as http:
        url = systems["gateway"].url + "/v1/stream"
        # A first token long enough for every subscriber to join the one stream.
        body = chat_body("one stream for everyone [sim ttft_ms=30000]")
        joining_started = time.monotonic()
        responses = []
        for start in range(0, subscribers, 500):
            batch = await asyncio.gather(*(
                http.post(url, json=body).__aenter__() for _ in range(start, min(subscribers, start + 500))
            ))
            for response in batch:
                assert (await response.content.readany()).startswith(b": ping")
            responses.extend(batch)
        joined_s = time.monotonic() - joining_started

        async def read(response: aiohttp.ClientResponse) -> list[float]:
            times = []
            async for chunk in response.content.iter_any():
                times.extend([time.monotonic()] * chunk.count(b"event: delta"))
            return times

        started = time.monotonic()
        arrivals = await asyncio.gather(*(read(r) for r in responses))
        elapsed = time.monotonic() - started
        records = await _sim_records(http, systems["sim"].url)
    complete = [a for a in arrivals if len(a) == tokens]
    spreads = [
        (max(a[k] for a in complete) - min(a[k] for a in complete)) * 1000 for k in range(tokens)
    ] if complete else []
    deliveries = sum(len(a) for a in arrivals)
    window = max(max(a) for a in complete) - min(min(a) for a in complete) if complete else elapsed
    return {"subscribers": subscribers, "joined_s": joined_s, "complete": len(complete),
            "upstream_calls": len(records),
            "deliveries": deliveries, "deliveries_per_s": deliveries / window if window else 0.0,
            "spread_p50_ms": percentile(spreads, 50), "spread_max_ms": max(spreads, default=None)}


# -- the report -----------------------------------------------------------------------------


async def report(*, quick: bool = False) -> str:
    out = ["## The gateway against the reference (issue 9)", ""]
    levels = (1, 50) if quick else (1, 50, 200, 1000)
    out += [f"### TTFT overhead (simulator TTFT {SIM_TTFT_MS} ms, distinct prompts)", "",
            "Overhead = the system's TTFT percentile minus the direct one, same run, interleaved.", ""]
    out += _overhead_table(await ttft_overhead(levels))
    out += ["", "### Cancel latency (client abort -> simulator logs the reset)", "",
            "| streams | measured | p50 (ms) | p95 (ms) | max (ms) |", "|---:|---:|---:|---:|---:|"]
    for row in await cancel_latency((1, 50) if quick else (1, 500)):
        out.append(f"| {row['streams']} | {row['measured']} | {_fmt(row['p50'], 2)} | "
                   f"{_fmt(row['p95'], 2)} | {_fmt(row['max'], 2)} |")
    out += ["", "### Relay throughput (ITL 10 ms per stream)", "",
            "| streams | offered chunks/s | gateway chunks/s | direct ITL p95 | gateway ITL p95 "
            "| added ITL p95 (ms) | gateway CPU s / 1000 chunks |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in await relay_throughput((50, 100) if quick else (50, 100, 200, 400)):
        itl = " | ".join(_fmt(row[name]) for name in ("direct_itl_p95", "gateway_itl_p95", "added_itl_p95"))
        out.append(
            f"| {row['streams']} | {row['offered_chunks_per_s']:,.0f} | {row['gateway_chunks_per_s']:,.0f} "
            f"| {itl} | {row['gateway_cpu_s_per_1000']:.3f} |"
        )
    memory = await idle_memory(1000 if quick else 10_000)
    out += ["", "### Memory per idle open stream", "",
            f"{memory['streams']:,} streams waiting for their first token: gateway RSS "
            f"{memory['baseline_mib']:.1f} -> {memory['loaded_mib']:.1f} MiB, "
            f"**{memory['kib_per_stream']:.1f} KiB per stream** (target <= 20 KiB)."]
    fan = await fanout_sockets(1000 if quick else 10_000)
    out += ["", "### Fan-out over real sockets (one upstream stream)", "",
            f"{fan['subscribers']:,} subscribers over their own TCP connections (all joined in "
            f"{fan['joined_s']:.1f} s), {fan['upstream_calls']} "
            f"upstream call(s); {fan['complete']:,} received every delta; "
            f"{fan['deliveries_per_s']:,.0f} deliveries/s; spread first->last subscriber per chunk "
            f"p50 {_fmt(fan['spread_p50_ms'])} ms, max {_fmt(fan['spread_max_ms'])} ms. "
            "The load generator (one Python process reading every socket) shares the machine "
            "and is part of this figure."]
    return "\n".join(out)


ROWS: dict[str, Callable[..., Any]] = {
    "ttft": ttft_overhead, "cancel": cancel_latency, "memory": idle_memory,
    "relay": relay_throughput, "fanout": fanout_sockets,
}

if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:
        print(json.dumps(asyncio.run(ROWS[sys.argv[1]]()), indent=1, default=str))
    else:
        print(asyncio.run(report(quick=True)))
