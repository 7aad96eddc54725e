"""The exchange log under load: 10,000 exchanges written while streams flow,
and the streams' TTFT with the log on against the same gateway with it off.

Three gateway processes share one simulator and one core: the log off, on a
SQLite file, on PostgreSQL (a server started for the run, when installed).
The load is N concurrent streams with distinct prompts (each one upstream
call, so each one exchange), sent round by round to each gateway in turn so
the machine's noise falls on all of them alike. After the load, each
gateway's ``gateway_exchange_log_written_total`` must reach the number of
streams it served (none dropped).

    python -m tests.perf.bench_exchanges [--exchanges 10000] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from tests.perf import procs
from tests.perf.client import Timing, percentile, timed_stream
from tests.perf.common import fmt, session

SIM_KNOBS = {"ttft_ms": 50, "ttft_jitter_ms": 0, "itl_ms": 5, "itl_jitter_ms": 0, "tokens": 8,
             "max_concurrent_streams": 5000}
#: A ceiling on the writers catching up after the load, never a wait.
WRITTEN_WITHIN_S = 60.0


@contextlib.contextmanager
def _postgres() -> Iterator[str | None]:
    try:
        from tests.integration.postgres_fixture import PG_BIN, running_postgres
    except ImportError:
        yield None
        return
    if PG_BIN is None:
        yield None
        return
    with running_postgres() as server:
        yield server.create_database("bench_exchanges")


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def _written(http: aiohttp.ClientSession, url: str, total: int) -> float:
    """Seconds until the gateway reports ``total`` exchanges written (to the
    polling's 10 ms)."""
    started = time.monotonic()
    async with asyncio.timeout(WRITTEN_WITHIN_S):
        while await _metric(http, url, "gateway_exchange_log_written_total") < total:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # another process's counter: polled, a bench step
    return time.monotonic() - started


async def bench(exchanges: int, concurrency: int) -> list[dict[str, Any]]:
    rounds = max(1, exchanges // concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-exchanges-") as workdir, _postgres() as pg_url:
        logs: dict[str, str | None] = {"off": None, "sqlite": f"sqlite:///{workdir}/exchanges.db"}
        if pg_url is not None:
            logs["postgresql"] = pg_url
        cores = sorted(os.sched_getaffinity(0))
        sim_core = cores[1] if len(cores) > 1 else None
        gw_core = cores[0] if len(cores) > 1 else None
        async with AsyncExitStack() as stack, session() as http:
            sim = await stack.enter_async_context(procs.simulator(core=sim_core, **SIM_KNOBS))
            gateways = {}
            for name, url in logs.items():
                env = {} if url is None else {"exchange_log_url": url}
                gateways[name] = await stack.enter_async_context(
                    procs.gateway(sim.url, core=gw_core, **env)
                )
            timings: dict[str, list[Timing]] = {name: [] for name in gateways}
            elapsed = dict.fromkeys(gateways, 0.0)
            lags: dict[str, list[float]] = {name: [] for name in gateways}
            for round_no in range(rounds + 1):  # round 0 warms up and is not timed
                for name, proc in gateways.items():
                    url = proc.url + "/v1/chat/completions"
                    started = time.monotonic()
                    batch = await asyncio.gather(*(
                        timed_stream(http, url, f"{name} {round_no} {i} {time.time_ns()}")
                        for i in range(concurrency)
                    ))
                    if round_no:
                        elapsed[name] += time.monotonic() - started
                        timings[name].extend(batch)
                        if logs[name] is not None:
                            # From the round's last stream end to all its records written.
                            lag = await _written(http, proc.url, (round_no + 1) * concurrency)
                            lags[name].append(lag)
            rows = []
            served = (rounds + 1) * concurrency
            for name, proc in gateways.items():
                ttft = [t.ttft_ms for t in timings[name] if t.ttft_ms is not None]
                errors = sum(1 for t in timings[name] if t.error is not None)
                row: dict[str, Any] = {
                    "log": name, "streams": len(timings[name]), "errors": errors,
                    "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
                    "streams_per_s": len(timings[name]) / elapsed[name],
                }
                if logs[name] is not None:
                    row["catch_up_s"] = await _written(http, proc.url, served)
                    row["lag_max_ms"] = max(lags[name]) * 1000
                    row["written"] = await _metric(http, proc.url,
                                                   "gateway_exchange_log_written_total")
                    row["dropped"] = await _metric(http, proc.url,
                                                   "gateway_exchange_log_dropped_total")
                rows.append(row)
            return rows


def table(rows: list[dict[str, Any]], concurrency: int) -> list[str]:
    out = [f"{concurrency} concurrent streams (sim TTFT 50 ms, 8 tokens at 5 ms), round by round.",
           "Write lag: from a round's last stream end until all its exchanges are written "
           "(the worst round; polled every 10 ms).",
           "", "| exchange log | streams timed | errors | TTFT p50 ms | TTFT p95 ms | streams/s "
           "| written (all rounds) | dropped | write lag max (ms) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(
            f"| {row['log']} | {row['streams']:,} | {row['errors']} | {fmt(row['ttft_p50'])} "
            f"| {fmt(row['ttft_p95'])} | {row['streams_per_s']:,.0f} "
            f"| {row.get('written', 0):,.0f} | {row.get('dropped', 0):,.0f} "
            f"| {fmt(row.get('lag_max_ms'))} |"
        )
    return out


async def section(exchanges: int = 10_000, concurrency: int = 200) -> list[str]:
    rows = await bench(exchanges, concurrency)
    return ["## The exchange log under load", "", *table(rows, concurrency)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.perf.bench_exchanges")
    parser.add_argument("--exchanges", type=int, default=10_000, help="timed streams per gateway")
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    print("\n".join(asyncio.run(section(args.exchanges, args.concurrency))))
