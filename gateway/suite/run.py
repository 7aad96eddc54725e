"""One run of the suite: the system up, the phases in order, the report out.

The phases run one after the other, never overlapping, so each measures the
system alone: the TTFT run (and its error rate), the burst, the cancels.
The processes of a local run are stopped before the report is printed, so
their shutdown can never write between the go/no-go lines.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TextIO

import aiohttp

from gateway.suite.cancel import run_cancel
from gateway.suite.config import SuiteConfig
from gateway.suite.phases import PhaseContext, run_burst, run_ttft
from gateway.suite.processes import Endpoints, local_system
from gateway.suite.progress import Progress
from gateway.suite.report import SuiteReport, passed, table, to_json, verdicts


def describe_system(config: SuiteConfig) -> str:
    if config.target is not None:
        return config.target
    sim = config.sim
    return (
        f"a local gateway + simulator (TTFT {sim.ttft_ms:g}±{sim.ttft_jitter_ms:g} ms, "
        f"ITL {sim.itl_ms:g}±{sim.itl_jitter_ms:g} ms, {sim.max_concurrency or 'unlimited'} at once)"
    )


async def run_suite(
    config: SuiteConfig, endpoints: Endpoints, *, progress: Progress | None = None
) -> SuiteReport:
    """The selected phases against ``endpoints``."""
    # No pool limit: the load shape alone decides what is in flight.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        context = PhaseContext(
            config=config,
            endpoints=endpoints,
            session=session,
            progress=progress if progress is not None else Progress(enabled=False),
            nonce=secrets.token_hex(4),
        )
        ttft = await run_ttft(context) if "ttft" in config.phases else None
        burst = await run_burst(context) if "burst" in config.phases else None
        cancel = await run_cancel(context) if "cancel" in config.phases else None
    return SuiteReport(
        config=config, system=describe_system(config), ttft=ttft, burst=burst, cancel=cancel
    )


async def run(config: SuiteConfig, progress: Progress) -> SuiteReport:
    """Against ``--target``, or against our own processes, stopped after."""
    if config.target is not None:
        return await run_suite(config, Endpoints(gateway_url=config.target), progress=progress)
    async with local_system(config) as endpoints:
        return await run_suite(config, endpoints, progress=progress)


def publish(report: SuiteReport, out: TextIO) -> int:
    """Write the JSON, print the table, the burst gate and the three go/no-go
    lines (the last three); return the exit status: 0 only if every one of
    them says PASS (a FAIL or a SKIP: 1)."""
    path = report.config.report_path
    Path(path).write_text(json.dumps(to_json(report), indent=2) + "\n")
    print(table(report), file=out)
    print(f"report: {path}", file=out)
    for verdict in verdicts(report):
        print(verdict.line, file=out)
    out.flush()
    return 0 if passed(report) else 1
