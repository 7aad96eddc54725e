"""TTFT overhead: the gateway's (and nginx's) TTFT percentiles minus the
direct ones, at 1 to 1,000 concurrent streams, with steady and burst
arrivals (issue 9). Each system in its own process, interleaved round by
round so the machine's noise falls on all of them alike."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.perf import procs
from tests.perf.client import Timing, percentile, steady_load, timed_stream
from tests.perf.common import SIM_TTFT_MS, fmt, session, verdict

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
    async with procs.systems(sim_knobs=knobs) as systems, session() as http:
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
            return "/".join(fmt(_overhead(row, name, q)) for q in (50, 95, 99))

        direct = "/".join(fmt(row[f"direct_p{q}"]) for q in (50, 95, 99))
        lines.append(
            f"| {row['concurrency']} | {row['pattern']} | {row['samples']} | {direct} "
            f"| {over('gateway')} | {over('nginx')} | {_ttft_ratio(row)} "
            f"| {row.get('gateway_errors', 0)}/{row.get('nginx_errors', 'n/a')} |"
        )
    return lines


async def section(levels: tuple[int, ...]) -> list[str]:
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
        out += ["", f"At 50 streams, steady: gateway TTFT overhead p95 **{fmt(at_50.get('steady'))} ms** "
                f"(target <= 2 ms: {verdict(at_50.get('steady'), 2.0)}); burst, the worst case: "
                f"{fmt(at_50.get('burst'))} ms."]
    return out
