"""CPU per request, and TTFT when a burst of distinct requests lands at once.

The same streamed requests through the gateway, through nginx
(``proxy_buffering off``) and straight to the simulator, in one run: 1-token
and 20-token answers, distinct prompts, a fixed number of clients each sending
its next request as soon as the previous one ends. Each proxy's CPU time is
read from /proc before and after (each thread's schedstat, to the nanosecond:
/proc/<pid>/stat counts 10 ms ticks, ~15 of them for nginx's 2,000 one-token
requests); a proxy's CPU per request is the figure, its ratio to nginx's the
verdict (the machine's noise falls on both).

The burst row is the cost seen by clients: N distinct requests released
together, so the last of them waits for the proxy to handle the ones before
it. Its TTFT overhead is the system's TTFT p95 minus the direct one.

``python -m tests.perf.bench_cpu [--quick]`` prints this section alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.perf import bench_ttft, procs
from tests.perf.client import timed_stream
from tests.perf.common import SIM_TTFT_MS, fmt, session

#: The requests' shape: a short first token and tokens 5 ms apart, so that
#: chunks of concurrent streams arrive interleaved, as real streams' do.
CPU_TTFT_MS, CPU_ITL_MS = 10, 5
TOKEN_COUNTS = (1, 20)
#: Targets: gateway CPU per request / nginx's, per token count.
CPU_RATIO_TARGETS = {1: 2.5, 20: 1.5}
#: Target: burst TTFT overhead p95, gateway <= nginx's + this many ms.
BURST_MARGIN_MS = 5.0
BURST_LEVEL = 50


def _directive(tokens: int) -> str:
    """The prompt directive that sets the simulator's answer for one request
    (the gateway forwards no client headers; the prompt reaches the upstream)."""
    return f"[sim ttft_ms={CPU_TTFT_MS} ttft_jitter_ms=0 itl_ms={CPU_ITL_MS} itl_jitter_ms=0 tokens={tokens}]"


async def _closed_loop(
    http: aiohttp.ClientSession, url: str, prefix: str, tokens: int, requests: int, clients: int
) -> int:
    """``requests`` streamed requests from ``clients`` closed-loop clients;
    how many failed."""
    remaining = requests
    errors = 0

    async def client(i: int) -> None:
        nonlocal remaining, errors
        sent = 0
        while remaining > 0:
            remaining -= 1
            timing = await timed_stream(http, url, f"{prefix} {i} {sent} {_directive(tokens)}")
            sent += 1
            if timing.error is not None or timing.first_token is None:
                errors += 1

    async with asyncio.TaskGroup() as group:
        for i in range(clients):
            group.create_task(client(i))
    return errors


async def cpu_per_request(
    requests: int = 2000, clients: int = 50, rounds: int = 2
) -> list[dict[str, Any]]:
    """One row per token count: each system's CPU per request (the proxy's,
    and the simulator's behind it), over ``requests`` requests split into
    ``rounds`` rounds, the systems taking turns within each round."""
    knobs = {"ttft_ms": SIM_TTFT_MS, "ttft_jitter_ms": 0, "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, session() as http:
        sim = systems["sim"]
        targets = {"direct": sim.url, **{n: p.url for n, p in systems.items() if n != "sim"}}
        rows = []
        for tokens in TOKEN_COUNTS:
            proxy_cpu = dict.fromkeys(targets, 0.0)
            sim_cpu = dict.fromkeys(targets, 0.0)
            errors = dict.fromkeys(targets, 0)
            elapsed = dict.fromkeys(targets, 0.0)
            done = dict.fromkeys(targets, 0)
            for round_no in range(rounds + 1):  # round 0 warms pools and code paths, not counted
                count = clients * 2 if round_no == 0 else requests // rounds
                order = list(targets)
                if round_no % 2 == 0:
                    order.reverse()
                for name in order:
                    proxy = systems.get(name)
                    before = (proxy.cpu_seconds_fine() if proxy else 0.0, sim.cpu_seconds_fine(),
                              time.monotonic())
                    failed = await _closed_loop(
                        http, targets[name] + "/v1/chat/completions",
                        f"cpu {name} {tokens} {round_no} {time.time_ns()}", tokens, count, clients,
                    )
                    if round_no == 0:
                        continue
                    elapsed[name] += time.monotonic() - before[2]
                    sim_cpu[name] += sim.cpu_seconds_fine() - before[1]
                    if proxy is not None:
                        proxy_cpu[name] += proxy.cpu_seconds_fine() - before[0]
                    errors[name] += failed
                    done[name] += count
            row: dict[str, Any] = {"tokens": tokens, "requests": done["direct"], "clients": clients}
            for name in targets:
                row[f"{name}_sim_ms"] = sim_cpu[name] / done[name] * 1000
                row[f"{name}_rps"] = done[name] / elapsed[name]
                row[f"{name}_errors"] = errors[name]
                if name != "direct":
                    row[f"{name}_cpu_ms"] = proxy_cpu[name] / done[name] * 1000
            rows.append(row)
    return rows


async def burst_ttft(level: int = BURST_LEVEL, rounds: int = 12) -> dict[str, Any]:
    """``rounds`` bursts of ``level`` distinct requests released together per
    system (the TTFT benchmark's burst pattern, the same simulator setting)."""
    knobs = {"ttft_ms": SIM_TTFT_MS, "ttft_jitter_ms": 0, "itl_ms": bench_ttft.TTFT_ITL_MS,
             "itl_jitter_ms": 0, "tokens": bench_ttft.TTFT_TOKENS, "max_concurrent_streams": 5000}
    async with procs.systems(sim_knobs=knobs) as systems, session() as http:
        targets = {name: proc.url + "/v1/chat/completions" for name, proc in systems.items()
                   if name != "sim"}
        targets["direct"] = systems["sim"].url + "/v1/chat/completions"
        samples = await bench_ttft._interleaved(http, targets, "burst", level, rounds, 1)
    row = bench_ttft._ttft_row(level, "burst", samples)
    for name in ("gateway", "nginx"):
        row[f"{name}_overhead_p95"] = bench_ttft._overhead(row, name, 95)
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ratio(row: dict[str, Any]) -> float | None:
    gateway, nginx = row.get("gateway_cpu_ms"), row.get("nginx_cpu_ms")
    return None if gateway is None or not nginx else gateway / nginx


def _cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| answer | requests each | gateway CPU/request | nginx CPU/request | gateway / nginx "
        "| simulator CPU/request: direct / via gateway (h2c) / via nginx (HTTP/1.1) "
        "| requests/s direct / gateway / nginx | errors direct/gw/nginx |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        ratio = _ratio(row)
        out.append(
            f"| {row['tokens']} token{'s' if row['tokens'] > 1 else ''} | {row['requests']:,} "
            f"| {_ms(row.get('gateway_cpu_ms'))} ms | {_ms(row.get('nginx_cpu_ms'))} ms "
            f"| {'n/a' if ratio is None else f'{ratio:.2f}x'} "
            f"| {' / '.join(_ms(row.get(f'{n}_sim_ms')) for n in ('direct', 'gateway', 'nginx'))} ms "
            f"| {' / '.join(fmt(row.get(f'{n}_rps'), 0) for n in ('direct', 'gateway', 'nginx'))} "
            f"| {'/'.join(str(row.get(f'{n}_errors', 'n/a')) for n in ('direct', 'gateway', 'nginx'))} |"
        )
    by_tokens = {row["tokens"]: row for row in rows}
    if 1 in by_tokens and 20 in by_tokens:
        per_token = {
            name: (by_tokens[20][f"{name}_cpu_ms"] - by_tokens[1][f"{name}_cpu_ms"]) / 19 * 1000
            for name in ("gateway", "nginx") if f"{name}_cpu_ms" in by_tokens[1]
        }
        out += ["", "CPU per further token ((20-token - 1-token) / 19): "
                + ", ".join(f"{name} {us:.1f} µs" for name, us in per_token.items()) + "."]
    out.append("")
    for row in rows:
        ratio, target = _ratio(row), CPU_RATIO_TARGETS[row["tokens"]]
        if ratio is None:
            out.append(f"- CPU per {row['tokens']}-token request <= {target}x nginx's: not measured.")
            continue
        met = ratio <= target
        gap = "" if met else f", {ratio / target - 1:.0%} over (needs {ratio / target:.2f}x less CPU)"
        out.append(f"- CPU per {row['tokens']}-token request <= {target}x nginx's: "
                   f"**{ratio:.2f}x**, {'met' if met else 'not met'}{gap}.")
    return out


def _burst_lines(row: dict[str, Any]) -> list[str]:
    gateway, nginx = row.get("gateway_overhead_p95"), row.get("nginx_overhead_p95")
    direct = "/".join(fmt(row[f"direct_p{q}"]) for q in (50, 95, 99))
    out = [
        "| streams | samples | direct TTFT p50/p95/p99 (ms) | gateway overhead p95 | nginx overhead p95 "
        "| errors gw/nginx |",
        "|---:|---:|---|---:|---:|---|",
        f"| {row['concurrency']} | {row['samples']} | {direct} | {fmt(gateway)} ms | {fmt(nginx)} ms "
        f"| {row.get('gateway_errors', 0)}/{row.get('nginx_errors', 'n/a')} |",
        "",
    ]
    if gateway is None or nginx is None:
        out.append(f"- Burst TTFT overhead p95 <= nginx's + {BURST_MARGIN_MS:.0f} ms: not measured.")
    else:
        limit = nginx + BURST_MARGIN_MS
        met = gateway <= limit
        out.append(f"- Burst TTFT overhead p95 <= nginx's + {BURST_MARGIN_MS:.0f} ms "
                   f"({fmt(limit)} ms): **{fmt(gateway)} ms**, "
                   f"{'met' if met else f'not met by {gateway - limit:.1f} ms'}.")
    return out


async def section(*, quick: bool = False) -> str:
    requests, clients = (400, 50) if quick else (2000, 50)
    rows = await cpu_per_request(requests, clients)
    burst = await burst_ttft(BURST_LEVEL, 3 if quick else 12)
    out = [
        "## CPU per request (issue 21)", "",
        f"Streamed requests with distinct prompts, {clients} closed-loop clients (each sends its "
        f"next request when the previous one ends), simulator TTFT {CPU_TTFT_MS} ms and "
        f"{CPU_ITL_MS} ms between tokens; the same requests straight to the simulator, through "
        "the gateway (h2c upstream) and through nginx (`proxy_buffering off`, HTTP/1.1 upstream), "
        "in one run, the systems taking turns in two rounds after a warm-up round. CPU is each "
        "process's on-CPU time over its requests, from /proc (the scheduler's per-thread "
        "schedstat, in nanoseconds; /proc/<pid>/stat's 10 ms ticks where there is none).", "",
    ]
    out += _cpu_table(rows)
    out += ["", f"### Synchronized burst ({BURST_LEVEL} distinct requests released together)", "",
            f"Simulator TTFT {SIM_TTFT_MS} ms; each round's {BURST_LEVEL} requests are sent in the same "
            "millisecond, the systems taking turns round by round; overhead = the system's TTFT "
            "p95 minus the direct one.", ""]
    out += _burst_lines(burst)
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.perf.bench_cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run")
    print(asyncio.run(section(quick=parser.parse_args().quick)))
