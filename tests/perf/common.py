"""What the gateway benchmarks share: the load generator's HTTP session,
the simulator's request log (it says when each upstream stream began and
ended, on the machine's monotonic clock) and the report's number format."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

SIM_TTFT_MS = 300  # the peers' figures in issue 9 were taken at this TTFT


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def verdict(value: float | None, target: float) -> str:
    return "not measured" if value is None else "met" if value <= target else "not met"


async def sim_records(http: aiohttp.ClientSession, sim_url: str) -> list[dict[str, Any]]:
    async with http.get(sim_url + "/admin/requests") as response:
        return list((await response.json())["requests"])


async def wait_records(
    http: aiohttp.ClientSession, sim_url: str, count: int, outcome: str | None = None
) -> None:
    query = f"count={count}&timeout_ms=20000" + (f"&outcome={outcome}" if outcome else "")
    async with http.get(sim_url + "/admin/requests/wait?" + query) as response:
        assert response.status == 200, f"simulator log did not reach {count} {outcome or ''}"


async def wait_arrivals(http: aiohttp.ClientSession, sim_url: str, count: int) -> None:
    """Until the simulator has seen ``count`` requests (ended or not). The
    admin wait endpoint counts ended ones only, so this polls (a benchmark
    set-up step, not a measurement)."""
    async with asyncio.timeout(60):
        while len(await sim_records(http, sim_url)) < count:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.05)
