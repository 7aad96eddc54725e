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
from contextlib import AsyncExitStack
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
#: The gateway with an HTTP/1.1 upstream: the table's second gateway column.
HTTP1 = "gateway_http1"
#: A bare aiohttp SSE handler with no upstream (tests/perf/floor_sse.py).
FLOOR = "floor"


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
    async with AsyncExitStack() as stack:
        systems = dict(await stack.enter_async_context(procs.systems(sim_knobs=knobs)))
        sim = systems["sim"]
        # The same gateway over HTTP/1.1 to the simulator, as nginx talks to
        # it (and as UPSTREAM_PROTOCOL=auto does for a plain http:// URL).
        systems[HTTP1] = await stack.enter_async_context(
            procs.gateway(sim.url, core=procs.gateway_core(), upstream_protocol="http1")
        )
        # The floor: aiohttp alone answering the same requests from its timers.
        systems[FLOOR] = await stack.enter_async_context(
            procs.python_service("tests.perf.floor_sse", [], {}, core=procs.gateway_core())
        )
        http = await stack.enter_async_context(session())
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


def h2_library_cost(requests: int = 2000) -> dict[str, float]:
    """The gateway's HTTP/2 client core (``H2ClientProtocol``: h2, hpack and
    hyperframe under it) in this process against an in-process h2 server,
    no sockets: process time per request to send a streamed chat request
    (HEADERS and its body), to take the response head, and per DATA frame
    of one chunk. Best of three passes (the least disturbed)."""
    import h2.config
    import h2.connection

    from gateway.upstream.base import UpstreamRequest
    from gateway.upstream.h2.protocol import H2ClientProtocol

    body = b'{"model":"sim","messages":[{"role":"user","content":"hello"}],"stream":true}'
    request = UpstreamRequest("POST", "/v1/chat/completions",
                              (("content-type", "application/json"), ("accept", "text/event-stream")), body)
    chunk = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"sim",'
             b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n')
    best = {"send_us": float("inf"), "head_us": float("inf"), "data_us": float("inf")}
    for _ in range(3):
        client = H2ClientProtocol(authority="127.0.0.1", scheme="http", ping_interval=None, ping_timeout=5)
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        client.initiate(0.0)
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive(server.data_to_send(), 0.0)
        server.receive_data(client.data_to_send())
        spent = dict.fromkeys(best, 0.0)
        for _ in range(requests):
            started = time.process_time()
            stream_id = client.start_request(request)
            client.send_data(stream_id, body, end_stream=True)
            sent = client.data_to_send()
            spent["send_us"] += time.process_time() - started
            server.receive_data(sent)
            server.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/event-stream")])
            head = server.data_to_send()
            server.send_data(stream_id, chunk)
            data = server.data_to_send()
            started = time.process_time()
            client.receive(head, 0.0)
            spent["head_us"] += time.process_time() - started
            started = time.process_time()
            client.receive(data, 0.0)
            client.consumed(stream_id, len(chunk))
            spent["data_us"] += time.process_time() - started
            server.end_stream(stream_id)
            client.receive(server.data_to_send(), 0.0)
            client.release(stream_id)
            server.receive_data(client.data_to_send())
        for name, seconds in spent.items():
            best[name] = min(best[name], seconds / requests * 1e6)
    return best


def _h2_lines(cost: dict[str, float], rows: list[dict[str, Any]]) -> list[str]:
    by_tokens = {row["tokens"]: row for row in rows}
    nginx_1 = by_tokens.get(1, {}).get("nginx_cpu_ms")
    nginx_20 = by_tokens.get(20, {}).get("nginx_cpu_ms")
    line = (f"The HTTP/2 library alone (`h2_library_cost`: the gateway's h2 client core in one "
            f"process against an in-process h2 server, no sockets): a request's HEADERS and body "
            f"out {cost['send_us']:.1f} µs, the response head in {cost['head_us']:.1f} µs, each "
            f"DATA frame of one chunk {cost['data_us']:.1f} µs.")
    if nginx_1 and nginx_20:
        # A 1-token answer is the head and ~4 DATA frames (role, token, usage, [DONE]).
        one = cost["send_us"] + cost["head_us"] + 4 * cost["data_us"]
        line += (f" For a 1-token request that is ~{one:.0f} µs, {one / 1000 / nginx_1:.1f}x nginx's "
                 f"whole CPU per request; for each further token {cost['data_us']:.1f} µs against "
                 f"nginx's {(nginx_20 - nginx_1) / 19 * 1000:.1f} µs.")
    return ["", line]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


#: The proxies of the table, with their column names.
PROXIES = {"gateway": "gateway (h2c upstream)", HTTP1: "gateway (HTTP/1.1 upstream)",
           "nginx": "nginx (HTTP/1.1 upstream)"}
SHORT = {"gateway": "gateway h2c", HTTP1: "gateway HTTP/1.1", "nginx": "nginx"}


def _ratio(row: dict[str, Any], name: str = "gateway") -> float | None:
    proxy, nginx = row.get(f"{name}_cpu_ms"), row.get("nginx_cpu_ms")
    return None if proxy is None or not nginx else proxy / nginx


def _cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    gateways = [name for name in PROXIES if name != "nginx"]
    short = " / ".join(("direct", *SHORT.values()))
    out = [
        "| answer | requests each | "
        + " | ".join(f"{label} CPU/request" for label in PROXIES.values())
        + " | " + " | ".join(f"{PROXIES[name]} / nginx" for name in gateways)
        + f" | simulator CPU/request: {short} | requests/s: {short} | errors: {short} |",
        "|---|---:|" + "---:|" * (len(PROXIES) + len(gateways)) + "---|---|---|",
    ]
    systems = ("direct", *PROXIES)
    for row in rows:
        ratios = [_ratio(row, name) for name in gateways]
        out.append(
            f"| {row['tokens']} token{'s' if row['tokens'] > 1 else ''} | {row['requests']:,} | "
            + " | ".join(f"{_ms(row.get(f'{name}_cpu_ms'))} ms" for name in PROXIES) + " | "
            + " | ".join("n/a" if ratio is None else f"{ratio:.2f}x" for ratio in ratios)
            + f" | {' / '.join(_ms(row.get(f'{n}_sim_ms')) for n in systems)} ms"
            + f" | {' / '.join(fmt(row.get(f'{n}_rps'), 0) for n in systems)}"
            + f" | {' / '.join(str(row.get(f'{n}_errors', 'n/a')) for n in systems)} |"
        )
    by_tokens = {row["tokens"]: row for row in rows}
    if 1 in by_tokens and 20 in by_tokens:
        per_token = {
            PROXIES[name]: (by_tokens[20][f"{name}_cpu_ms"] - by_tokens[1][f"{name}_cpu_ms"]) / 19 * 1000
            for name in PROXIES if f"{name}_cpu_ms" in by_tokens[1]
        }
        out += ["", "CPU per further token ((20-token - 1-token) / 19): "
                + ", ".join(f"{name} {us:.1f} µs" for name, us in per_token.items()) + "."]
    if all(f"{FLOOR}_cpu_ms" in row for row in rows):
        floor = ", ".join(f"{row[f'{FLOOR}_cpu_ms']:.3f} ms per {row['tokens']}-token request"
                          for row in rows)
        if 1 in by_tokens and 20 in by_tokens:
            per_token_floor = (by_tokens[20][f"{FLOOR}_cpu_ms"] - by_tokens[1][f"{FLOOR}_cpu_ms"]) / 19 * 1000
            floor += f" ({per_token_floor:.1f} µs per further token)"
        out += ["", "The floor, in the same rounds on the same core: a bare aiohttp SSE handler "
                "(tests/perf/floor_sse.py: the same answers from its own timers, no upstream, no "
                f"validation) takes {floor}."]
    out.append("")
    for name in gateways:
        for row in rows:
            ratio, target = _ratio(row, name), CPU_RATIO_TARGETS[row["tokens"]]
            what = f"{PROXIES[name]}: CPU per {row['tokens']}-token request <= {target}x nginx's"
            if ratio is None:
                out.append(f"- {what}: not measured.")
                continue
            met = ratio <= target
            gap = "" if met else f", {ratio / target - 1:.0%} over (needs {ratio / target:.2f}x less CPU)"
            out.append(f"- {what}: **{ratio:.2f}x**, {'met' if met else 'not met'}{gap}.")
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
        # An overhead below zero is the direct path's spread, not a proxy
        # faster than no proxy: the reference's counts as zero.
        limit = max(nginx, 0.0) + BURST_MARGIN_MS
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
        "the gateway (h2c upstream, and a second one over HTTP/1.1) and through nginx "
        "(`proxy_buffering off`, HTTP/1.1 upstream), in one run, the systems taking turns in two "
        "rounds after a warm-up round; both gateways share nginx's core. CPU is each "
        "process's on-CPU time over its requests, from /proc (the scheduler's per-thread "
        "schedstat, in nanoseconds; /proc/<pid>/stat's 10 ms ticks where there is none).", "",
    ]
    out += _cpu_table(rows)
    out += _h2_lines(h2_library_cost(500 if quick else 2000), rows)
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
