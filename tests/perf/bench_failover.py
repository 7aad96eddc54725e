"""What a fallback costs the client's TTFT, over real sockets.

``python -m tests.perf.bench_failover``: simulator instances in process
(5 ms TTFT), a gateway with a routing file, 40 sequential streams per
case, the ``ttft_ms`` of each one's meta record: the backup alone; a
refused port first; an upstream answering 503 first (circuit never
opening); and that 503 upstream behind an open circuit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics

import aiohttp

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.routing.config import parse_routing
from gateway.sim import SimServer
from gateway.state import STATE
from tests.integration.conftest import FAST_SIM
from tests.integration.test_routing import Routed, refused_url, stream_text, upstream

STREAMS = 40


async def case(label: str, primary_url: str | None, backup: SimServer, circuit: int) -> None:
    toml = ((upstream("primary", primary_url) if primary_url else "")
            + upstream("backup", backup.url, priority=1)
            + f"[routing]\ncircuit_failures = {circuit}\nretry_budget_min = 1000\n")
    settings = Settings(host="127.0.0.1", port=0, routing=parse_routing(toml, {}))
    async with running_gateway(settings) as (app, url), aiohttp.ClientSession() as http:
        gateway = Routed(url, app[STATE])
        ttfts = sorted([(await stream_text(http, gateway, f"{label} {i}"))[1]["ttft_ms"]
                        for i in range(STREAMS)])
    p95 = ttfts[int(0.95 * (STREAMS - 1))]
    print(f"{label:30} median {statistics.median(ttfts):6.2f} ms  p95 {p95:6.2f} ms")


async def main() -> None:
    backup = SimServer(FAST_SIM)
    broken = SimServer(dataclasses.replace(FAST_SIM, fail_status=503))
    await backup.start()
    await broken.start()
    try:
        await case("backup alone", None, backup, 1000)
        await case("refused port, then backup", refused_url(), backup, 1000)
        await case("503, then backup", broken.url, backup, 1000)
        await case("503 behind an open circuit", broken.url, backup, 1)
    finally:
        await backup.aclose()
        await broken.aclose()


if __name__ == "__main__":
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    asyncio.run(main())
