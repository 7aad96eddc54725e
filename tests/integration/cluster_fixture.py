"""A real cluster for tests: redis-server and gateway processes.

``running_redis`` starts ``redis-server`` (the Debian package) in the
foreground as our child, on a free loopback port, in a temporary directory,
with persistence off (``--save '' --appendonly no``); it can be stopped and
started again on the same port, or paused (SIGSTOP: a Redis that accepts
connections and never answers). ``running_member`` starts one ``python -m
gateway`` process pointed at it and at a simulator, and reads its metrics and
``/stats``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from gateway.suite.processes import Service, started_service
from tests.integration.nginx_fixture import free_port

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
START_TIMEOUT_S = 10.0
READY = b"Ready to accept connections"


@dataclass
class RedisServer:
    port: int
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        process = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        ready = asyncio.get_running_loop().create_future()

        async def read_log() -> None:
            assert process.stdout is not None
            lines = []
            while line := await process.stdout.readline():
                lines.append(line)
                if READY in line and not ready.done():
                    ready.set_result(None)
            if not ready.done():
                ready.set_exception(RuntimeError(b"redis-server exited:\n".join(lines).decode()))

        self.process = process
        self._reader = asyncio.create_task(read_log(), name="redis-server log")
        async with asyncio.timeout(START_TIMEOUT_S):
            await ready

    async def stop(self) -> None:
        process, reader = self.process, self._reader
        self.process = self._reader = None
        if process is None or reader is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
        await process.wait()
        await reader

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def keys(self, *names: str) -> int:
        """How many of these keys exist, or with no names how many keys Redis holds."""
        client = Redis.from_url(self.url)
        try:
            return int(await client.exists(*names) if names else await client.dbsize())
        finally:
            await client.aclose()

    async def commandstats(self) -> dict[str, int]:
        """Calls per command since the start (``INFO commandstats``)."""
        client = Redis.from_url(self.url)
        try:
            info = await client.info("commandstats")
        finally:
            await client.aclose()
        return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


@asynccontextmanager
async def running_redis(workdir: Path) -> AsyncIterator[RedisServer]:
    os.makedirs(workdir, exist_ok=True)
    server = RedisServer(port=free_port(), workdir=workdir)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


_METRIC = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


@dataclass
class Member:
    """One gateway process of the cluster."""

    service: Service
    url: str

    @property
    def pid(self) -> int:
        return self.service.process.pid

    @property
    def output(self) -> list[str]:
        return list(self.service.tail)

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/stats") as resp:
            return dict(await resp.json())

    async def metric(self, name: str, labels: str = "") -> float:
        """A sample of /metrics (0.0 when absent), e.g. ``role="owner"``."""
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            match = _METRIC.match(line)
            if match and match.group(1) == name and (match.group(2) or "") == labels:
                return float(match.group(3))
        return 0.0

    async def wait_metric(self, name: str, value: float, labels: str = "", *,
                          timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a ceiling
        """Until the sample reads ``value`` (re-read every 50 ms: the
        gauge is the event)."""
        async with asyncio.timeout(timeout):
            while await self.metric(name, labels) != value:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.service.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def running_member(
    sim_url: str, redis_url: str | None, env: Mapping[str, str] | None = None
) -> AsyncIterator[Member]:
    settings = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("GATEWAY_", "UPSTREAM_", "CLUSTER_", "REDIS_"))
    }
    settings |= {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": "0",
        "UPSTREAM_URL": sim_url,
        "UPSTREAM_PROTOCOL": "h2c",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "console",
        "DRAIN_TIMEOUT_S": "1",
        # The tests count upstream calls: a Redis reply slowed past 250 ms by
        # a loaded test machine would serve a request locally (by design)
        # and add one. A paused Redis still costs a request at most 1 s.
        "CLUSTER_REDIS_TIMEOUT_MS": "1000",
        **({} if redis_url is None else {"REDIS_URL": redis_url}),
        **(env or {}),
    }
    async with started_service("gateway", "gateway", [], settings) as service:
        yield Member(service, service.url.result())
