"""The systems under benchmark, each in its own process on its own core.

The simulator, the gateway and (as the reference proxy) nginx run as
subprocesses on free ports; each is pinned to a core where the machine has
enough of them, so the load generator (this process) does not steal from the
system it measures. Every process is stopped on exit: nothing is left behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.suite.processes import started_service


@dataclass(frozen=True)
class Proc:
    process: asyncio.subprocess.Process
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def cpu_seconds_fine(self) -> float:
        """CPU time to the nanosecond: the scheduler's on-CPU time of each of
        the process's threads (/proc/<pid>/task/*/schedstat), where
        ``cpu_seconds`` counts clock ticks (10 ms); ``cpu_seconds`` where the
        kernel has no schedstat."""
        total = 0
        try:
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return self.cpu_seconds()
        return total / 1e9


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _pinned(core: int | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


@asynccontextmanager
async def python_service(
    module: str, args: list[str], env: Mapping[str, str], *, core: int | None
) -> AsyncIterator[Proc]:
    """``python -m module args`` (pinned to ``core``) until it prints its
    ``listening on URL`` line: the TTFT suite's own process handling."""
    async with started_service(
        module, module, args, {**os.environ, **env}, prefix=_pinned(core)
    ) as child:
        yield Proc(child.process, child.url.result())


@asynccontextmanager
async def simulator(*, core: int | None, **knobs: object) -> AsyncIterator[Proc]:
    args = ["--host", "127.0.0.1", "--port", "0"]
    for name, value in knobs.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    async with python_service("gateway.sim", args, {}, core=core) as proc:
        yield proc


@asynccontextmanager
async def gateway(upstream: str, *, core: int | None, **env: object) -> AsyncIterator[Proc]:
    settings = {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": "0",
        "UPSTREAM_URL": upstream + "/v1",
        "UPSTREAM_PROTOCOL": "h2c",
        "LOG_LEVEL": "warning",
        "MAX_INFLIGHT": "20000",
        "MAX_QUEUE": "20000",
        **{k.upper(): str(v) for k, v in env.items()},
    }
    async with python_service("gateway", [], settings, core=core) as proc:
        yield proc


_NGINX_CONF = """
worker_processes 1;
# One process: its CPU and RSS are the reference's whole cost.
master_process off;
events {{ worker_connections 30000; }}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream sim {{ server 127.0.0.1:{upstream_port}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


@asynccontextmanager
async def nginx(upstream: str, port: int, *, core: int | None) -> AsyncIterator[Proc | None]:
    """nginx as a plain reverse proxy to ``upstream``: the reference. Yields
    None where nginx is not installed."""
    binary = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if binary is None:
        yield None
        return
    upstream_port = int(upstream.rsplit(":", 1)[1])
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(prefix=prefix, port=port, upstream_port=upstream_port))
        process = await asyncio.create_subprocess_exec(
            *_pinned(core), binary, "-p", prefix, "-c", str(conf), "-g", "daemon off;",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        await asyncio.sleep(0.05)  # nginx has no readiness line to wait on
                        continue
                    writer.close()
                    await writer.wait_closed()
                    break
            yield Proc(process, f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            await process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_core() -> int | None:
    """The core the systems under test are pinned to (None: one core only)."""
    cores = _cores()
    return cores[0] if len(cores) > 1 else None


@asynccontextmanager
async def systems(
    *, with_nginx: bool = True, sim_knobs: Mapping[str, object] | None = None,
    gateway_env: Mapping[str, object] | None = None,
) -> AsyncIterator[dict[str, Proc]]:
    """sim (core 1), gateway (core 0), nginx (core 0, only when measured alone)."""
    cores = _cores()
    sim_core = cores[1] if len(cores) > 1 else None
    gw_core = gateway_core()
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(simulator(core=sim_core, **(sim_knobs or {})))
        out = {"sim": sim}
        out["gateway"] = await stack.enter_async_context(
            gateway(sim.url, core=gw_core, **(gateway_env or {}))
        )
        if with_nginx:
            ref = await stack.enter_async_context(nginx(sim.url, free_port(), core=gw_core))
            if ref is not None:
                out["nginx"] = ref
        yield out
