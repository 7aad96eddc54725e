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
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.sim.content import prompt_digest
from tests.perf import procs
from tests.perf.client import Timing, chat_body, percentile, steady_load, timed_stream

SIM_TTFT_MS = 300  # the peers' figures in issue 9 were taken at this TTFT


def _session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -- TTFT overhead ------------------------------------------------------------------


TTFT_ITL_MS, TTFT_TOKENS = 10, 8
#: One stream's duration: the steady clients' stagger spreads N starts over it.
STREAM_CYCLE_S = (SIM_TTFT_MS + TTFT_TOKENS * TTFT_ITL_MS) / 1000


async def ttft_overhead(levels: tuple[int, ...] = (1, 50, 200, 1000)) -> list[dict[str, Any]]:
    """Both arrival patterns at each level: ``steady`` (N closed-loop clients,
    starts staggered) and ``burst`` (N requests sent in the same millisecond,
    round after round). Same sample count per system and pattern."""
    rows = []
    knobs = {"ttft_ms": SIM_TTFT_MS, "ttft_jitter_ms": 0, "itl_ms": TTFT_ITL_MS, "itl_jitter_ms": 0,
             "tokens": TTFT_TOKENS, "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, _session() as http:
        targets = {name: proc.url + "/v1/chat/completions" for name, proc in systems.items()
                   if name != "sim"}
        targets["direct"] = systems["sim"].url + "/v1/chat/completions"
        for level in levels:
            rounds = max(2, min(30, 600 // level))  # a burst round times `level` requests
            # A steady round is longer (stagger, untimed ramp and drain), so fewer
            # rounds of several requests per client, for as many samples.
            per_client = max(1, rounds // 3)
            for pattern, pattern_rounds in (("steady", rounds // per_client), ("burst", rounds)):
                samples = await _interleaved(http, targets, pattern, level, pattern_rounds, per_client)
                rows.append(_ttft_row(level, pattern, samples))
    return rows


async def _interleaved(
    http: aiohttp.ClientSession, targets: dict[str, str], pattern: str, level: int, rounds: int,
    per_client: int,
) -> dict[str, list[Timing]]:
    """``rounds`` rounds of ``pattern`` at ``level``, the systems taking turns
    within each round so the machine's noise falls on all of them alike."""
    samples: dict[str, list[Timing]] = {name: [] for name in targets}
    for round_no in range(rounds + 1):  # round 0 warms connections up and is dropped
        for name, url in targets.items():
            prompt = f"{name} {pattern} {level} {round_no} {time.time_ns()}"
            if pattern == "burst":
                timings = await asyncio.gather(*(
                    timed_stream(http, url, f"{prompt} {i}") for i in range(level)
                ))
            else:
                timings = await steady_load(http, url, prompt, clients=level, cycle_s=STREAM_CYCLE_S,
                                            per_client=per_client if round_no else 1)
            if round_no:
                samples[name].extend(timings)
    return samples


def _ttft_row(level: int, pattern: str, samples: dict[str, list[Timing]]) -> dict[str, Any]:
    row: dict[str, Any] = {"concurrency": level, "pattern": pattern, "samples": len(samples["direct"])}
    for name, timings in samples.items():
        values = [t.ttft_ms for t in timings if t.ttft_ms is not None]
        for q in (50, 95, 99):
            row[f"{name}_p{q}"] = percentile(values, q)
        row[f"{name}_errors"] = len(timings) - len(values)
    return row


def _overhead(row: dict[str, Any], name: str, q: int) -> float | None:
    """The system's TTFT percentile minus the direct one, same run."""
    if row.get(f"{name}_p{q}") is None or row.get(f"direct_p{q}") is None:
        return None
    return float(row[f"{name}_p{q}"] - row[f"direct_p{q}"])


def _ttft_ratio(row: dict[str, Any]) -> str:
    gateway, nginx = row.get("gateway_p95"), row.get("nginx_p95")
    return "n/a" if not gateway or not nginx else f"{gateway / nginx:.3f}"


def _overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| streams | arrivals | samples | direct p50/p95/p99 (ms) | gateway overhead p50/p95/p99 (ms) "
        "| nginx overhead p50/p95/p99 (ms) | TTFT p95 gateway / nginx | errors gw/nginx |",
        "|---:|---|---:|---|---|---|---:|---|",
    ]
    for row in rows:
        def over(name: str, row: dict[str, Any] = row) -> str:
            if row.get(f"{name}_p50") is None:
                return "n/a"
            return "/".join(_fmt(_overhead(row, name, q)) for q in (50, 95, 99))

        direct = "/".join(_fmt(row[f"direct_p{q}"]) for q in (50, 95, 99))
        lines.append(
            f"| {row['concurrency']} | {row['pattern']} | {row['samples']} | {direct} "
            f"| {over('gateway')} | {over('nginx')} | {_ttft_ratio(row)} "
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
    knobs = {"ttft_ms": 20, "ttft_jitter_ms": 0, "itl_ms": 500, "itl_jitter_ms": 0, "tokens": 100_000,
             "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, _session() as http:
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
    responses = await _open_streams(http, url, prompts)
    closed: dict[str, float] = {}
    if pattern == "spread":
        await _abort_spread(responses, keys, closed)
    else:
        for response, key in zip(responses, keys, strict=True):
            _abort(response, key, closed)
    await _wait_records(http, sim_url, level)
    latencies = [
        (record["end"] - closed[record["prompt_sha"]]) * 1000
        for record in await _sim_records(http, sim_url)
        if record["prompt_sha"] in closed and record["end"] is not None
    ]
    return {"streams": level, "pattern": pattern, "measured": len(latencies),
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "max": max(latencies, default=None)}


async def _open_streams(
    http: aiohttp.ClientSession, url: str, prompts: list[str]
) -> list[aiohttp.ClientResponse]:
    """One stream per prompt, each mid-stream (its first content read) before
    any is aborted."""
    responses = [await http.post(url, json=chat_body(p)).__aenter__() for p in prompts]
    for response in responses:
        while b'"content":"' not in await response.content.readany():
            pass
    return responses


async def _abort_spread(
    responses: list[aiohttp.ClientResponse], keys: list[str], closed: dict[str, float]
) -> None:
    """Every client keeps reading its stream until its own moment, then
    aborts: one abort every SPREAD_S / N seconds, the streams in a seeded
    random order, the others streaming on meanwhile."""
    order = list(range(len(responses)))
    random.Random(SPREAD_SEED).shuffle(order)
    gap = SPREAD_S / len(responses)
    start = asyncio.get_running_loop().time()
    async with asyncio.TaskGroup() as group:
        for slot, i in enumerate(order):
            group.create_task(_read_then_abort(responses[i], start + (slot + 1) * gap, keys[i], closed))


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


# -- memory per idle stream -----------------------------------------------------------


NGINX_IDLE_STREAMS = 8_000


async def idle_memory(streams: int = 10_000) -> dict[str, Any]:
    """RSS per idle open stream, the gateway's and (the reference) nginx's,
    one after the other against the same simulator."""
    knobs = {"ttft_ms": 600_000, "ttft_jitter_ms": 0, "tokens": 4, "max_concurrent_streams": 20_000}
    env = {"upstream_max_connections": 4, "ping_interval_s": 600}
    out: dict[str, Any] = {"streams": streams}
    async with procs.systems(sim_knobs=knobs, gateway_env=env) as systems, _session() as http:
        arrived = 0
        sim_url = systems["sim"].url
        for name in ("gateway", "nginx"):
            if name in systems:
                # nginx holds two sockets a stream (client, upstream): fewer
                # streams keep it under this machine's 20,000 open files.
                count = streams if name == "gateway" else min(streams, NGINX_IDLE_STREAMS)
                out[name], arrived = await _idle_rss(http, systems[name], sim_url, count, arrived)
    return out


async def _idle_rss(
    http: aiohttp.ClientSession, proc: procs.Proc, sim_url: str, streams: int, arrived: int
) -> tuple[dict[str, float], int]:
    """Open ``streams`` streams through ``proc`` that wait for their first
    token; its RSS before and after, and the simulator's arrival count."""
    url = proc.url + "/v1/chat/completions"
    # Warm-up: code paths, pools, one upstream connection per slot.
    warm = [await http.post(url, json=chat_body(f"warm {i} {time.time_ns()}")).__aenter__()
            for i in range(50)]
    for response in warm:
        await response.content.readany()
        response.close()
    arrived += len(warm)
    await _wait_arrivals(http, sim_url, arrived)
    await asyncio.sleep(0.5)  # let the system finish its cleanups before the baseline
    baseline = proc.rss_kib()
    responses = []
    for start in range(0, streams, 500):
        batch = await asyncio.gather(*(
            http.post(url, json=chat_body(f"idle {i} {time.time_ns()}")).__aenter__()
            for i in range(start, min(streams, start + 500))
        ))
        for response in batch:
            assert response.status == 200 and await response.content.readany()
        responses.extend(batch)
    arrived += streams
    await _wait_arrivals(http, sim_url, arrived)
    loaded = proc.rss_kib()
    for response in responses:
        response.close()
    return {"streams": streams, "baseline_mib": baseline / 1024, "loaded_mib": loaded / 1024,
            "kib_per_stream": (loaded - baseline) / streams}, arrived


# -- relay throughput -------------------------------------------------------------------


async def relay_throughput(stream_counts: tuple[int, ...] = (50, 100, 200, 400)) -> list[dict[str, Any]]:
    rows = []
    itl_ms, tokens = 10, 150
    knobs = {"ttft_ms": 20, "ttft_jitter_ms": 0, "itl_ms": itl_ms, "itl_jitter_ms": 0,
             "tokens": tokens, "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, _session() as http:
        targets = {name: proc.url for name, proc in systems.items() if name != "sim"}
        targets = {"direct": systems["sim"].url, **targets}
        for count in stream_counts:
            row: dict[str, Any] = {"streams": count, "offered_chunks_per_s": count * 1000 / itl_ms}
            for name, base in targets.items():
                proxy = systems.get(name)
                cpu_before = proxy.cpu_seconds() if proxy is not None else 0.0
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
                if proxy is not None:
                    row[f"{name}_cpu_s_per_1000"] = (proxy.cpu_seconds() - cpu_before) / chunks * 1000
                    row[f"{name}_added_itl_p95"] = row[f"{name}_itl_p95"] - row["direct_itl_p95"]
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


async def _ttft_section(levels: tuple[int, ...]) -> list[str]:
    rows = await ttft_overhead(levels)
    out = [
        f"### TTFT overhead (simulator TTFT {SIM_TTFT_MS} ms, distinct prompts)", "",
        "Overhead = the system's TTFT percentile minus the direct one, same run, the systems "
        "interleaved round by round. Two arrival patterns at each level, as many samples each:", "",
        f"- **steady**: N closed-loop clients, their first requests staggered evenly over one "
        f"stream's duration ({STREAM_CYCLE_S * 1000:.0f} ms), each sending its next request as soon "
        "as the previous one ends: N streams open at any moment, arrivals spread out as many "
        "users' are. Only requests sent while all N clients run are timed.",
        "- **burst**: each round's N requests sent in the same millisecond, round after round: "
        "the worst case.", "",
        "The target (TTFT overhead p95 <= 2 ms at 50 concurrent streams) is compared with the "
        "steady row: N streams in flight, which is what the target describes. The burst row shows "
        "the gateway's per-request cost queueing when N requests land in the same millisecond: "
        "the last of them waits for the gateway to handle the N-1 before it.", "",
    ]
    out += _overhead_table(rows)
    at_50 = {row["pattern"]: _overhead(row, "gateway", 95) for row in rows if row["concurrency"] == 50}
    if at_50:
        out += ["", f"At 50 streams, steady: gateway TTFT overhead p95 **{_fmt(at_50.get('steady'))} ms** "
                f"(target <= 2 ms: {_verdict(at_50.get('steady'), 2.0)}); burst, the worst case: "
                f"{_fmt(at_50.get('burst'))} ms."]
    return out


async def _cancel_section(levels: tuple[int, ...]) -> list[str]:
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
                   f"| {_fmt(row['p50'], 2)} | {_fmt(row['p95'], 2)} | {_fmt(row['max'], 2)} |")
    at_500 = {row["pattern"]: row["p95"] for row in rows
              if row["streams"] == 500 and row["system"] == "gateway"}
    if at_500:
        out += ["", f"At 500 streams, spread: cancel latency p95 **{_fmt(at_500.get('spread'), 2)} ms** "
                f"(target <= 5 ms: {_verdict(at_500.get('spread'), 5.0)}); burst, the worst case: "
                f"{_fmt(at_500.get('burst'), 2)} ms."]
    return out


def _reference(row: dict[str, Any], key: str, spec: str = ".1f") -> str:
    value = row.get(key)
    return "n/a" if value is None else format(value, spec)


def _cpu_ratio(row: dict[str, Any]) -> str:
    gateway, nginx = row["gateway_cpu_s_per_1000"], row.get("nginx_cpu_s_per_1000")
    if not nginx:
        return f"{gateway:.3f} / n/a"
    return f"{gateway:.3f} / {nginx:.3f} ({gateway / nginx:.1f}x)"


def _verdict(value: float | None, target: float) -> str:
    return "not measured" if value is None else "met" if value <= target else "not met"


async def report(*, quick: bool = False) -> str:
    out = ["## The gateway against the reference (issue 9)", ""]
    out += await _ttft_section((1, 50) if quick else (1, 50, 200, 1000))
    out += await _cancel_section((1, 50) if quick else (1, 500))
    out += ["", "### Relay throughput (ITL 10 ms per stream)", "",
            "Chunks delivered per second, the inter-token latency each system adds at p95 (its "
            "ITL p95 minus the direct one, same run) and its CPU per 1,000 chunks; nginx relays "
            "the same streams as the reference (its ratio: gateway CPU per chunk / nginx's).", "",
            "| streams | offered chunks/s | direct ITL p95 | gateway chunks/s | gateway added ITL p95 "
            "| nginx chunks/s | nginx added ITL p95 | CPU s / 1000 chunks gw / nginx (ratio) |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in await relay_throughput((50, 100) if quick else (50, 100, 200, 400)):
        out.append(
            f"| {row['streams']} | {row['offered_chunks_per_s']:,.0f} | {_fmt(row['direct_itl_p95'])} "
            f"| {row['gateway_chunks_per_s']:,.0f} | {_fmt(row['gateway_added_itl_p95'])} "
            f"| {_reference(row, 'nginx_chunks_per_s', ',.0f')} | {_reference(row, 'nginx_added_itl_p95')} "
            f"| {_cpu_ratio(row)} |"
        )
    memory = await idle_memory(1000 if quick else 10_000)
    gateway_mem, nginx_mem = memory["gateway"], memory.get("nginx")
    out += ["", "### Memory per idle open stream", "",
            f"{memory['streams']:,} streams waiting for their first token: gateway RSS "
            f"{gateway_mem['baseline_mib']:.1f} -> {gateway_mem['loaded_mib']:.1f} MiB, "
            f"**{gateway_mem['kib_per_stream']:.1f} KiB per stream** (target <= 20 KiB)"]
    if nginx_mem is not None:
        out[-1] += (f"; nginx, the reference, with {nginx_mem['streams']:,} such streams: "
                    f"{nginx_mem['baseline_mib']:.1f} -> {nginx_mem['loaded_mib']:.1f} MiB, "
                    f"{nginx_mem['kib_per_stream']:.1f} KiB per stream (gateway / nginx: "
                    f"{gateway_mem['kib_per_stream'] / max(nginx_mem['kib_per_stream'], 0.01):.1f}x)")
    out[-1] += "."
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
