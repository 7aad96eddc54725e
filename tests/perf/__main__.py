"""``make bench``: run every benchmark and rewrite BENCHMARKS.md.

Figures come from this command only, with the machine they were taken on.
``--quick`` runs smaller sizes (a smoke run; it does not rewrite the file
unless ``--write`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

from tests.perf import bench_cluster, bench_fanout, bench_gateway, bench_h2_relay

OUT = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
PROFILES = Path(__file__).resolve().parent / "PROFILES.md"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


async def _fanout_section() -> str:
    lines = [
        "## Fan-out in memory (issue 3)",
        "",
        "One in-memory source, N subscribers reading the actor's log (no sockets).",
        "",
        "| subscribers | chunks | deliveries/s | per chunk (µs) |",
        "|---:|---:|---:|---:|",
    ]
    for subscribers in (1, 100, 1000, 10_000):
        chunks = max(20, min(2000, 200_000 // subscribers))
        result = await bench_fanout.bench_fanout(subscribers, chunks)
        lines.append(
            f"| {subscribers:,} | {chunks} | {result['deliveries_per_s']:,.0f} "
            f"| {result['per_chunk_us']:,.1f} |"
        )
    return "\n".join(lines)


async def _ttft_suite_section() -> str:
    """`make ttft` as an operator runs it, its human table kept whole."""
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as workdir:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.suite",
            cwd=workdir, env={**os.environ, "CI": "true"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    text = output.decode(errors="replace").rstrip()
    return "\n".join([
        "## The TTFT suite (issue 6)",
        "",
        f"`make ttft` on this machine (exit status {process.returncode}):",
        "",
        "```",
        text,
        "```",
    ])


async def main(quick: bool) -> str:
    sections = [
        await _ttft_suite_section(),
        await bench_h2_relay.report(),
        await _fanout_section(),
        await bench_gateway.report(quick=quick),
        "\n".join(await bench_cluster.section(quick=quick)),
    ]
    header = [
        "# Benchmarks",
        "",
        f"Command: `make bench`{' (--quick)' if quick else ''} · taken "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"Machine: {_machine()}",
        "",
        "Every system runs in its own process; the simulator and the system under test are",
        "pinned to one core each, the load generator shares the machine. Compare ratios taken",
        "in one run: this machine has 2 noisy cores.",
        "",
    ]
    body = "\n".join(header) + "\n" + "\n\n".join(sections)
    if PROFILES.exists():
        body += "\n\n" + PROFILES.read_text()
    return body + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--write", action="store_true", help="with --quick: rewrite BENCHMARKS.md anyway")
    args = parser.parse_args()
    text = asyncio.run(main(args.quick))
    print(text)
    if not args.quick or args.write:
        OUT.write_text(text)
        print(f"wrote {OUT}", file=sys.stderr)
