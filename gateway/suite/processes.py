"""The system under test, started for one run and stopped after it.

``make ttft`` starts the simulator and the gateway as their own processes, as
they run in production, on free ports (each prints its ``listening on URL``
line once bound: we read the port from it, so nothing can take it in
between). Their environment is this one minus every setting either reads,
plus ours: an operator's exported ``UPSTREAM_URL`` or ``GATEWAY_API_KEYS``
cannot leak into the run, and nothing needs restoring afterwards.

Stopping is SIGTERM (both drain and exit 0), then SIGKILL if one hangs, and
always a ``wait()``: no process, pipe or reader task is left behind, also
when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from gateway.__main__ import environment_variables
from gateway.errors import GatewayError
from gateway.suite.config import SuiteConfig

_LISTENING = re.compile(r"listening on (https?://\S+)")
#: Lines of a service's output kept for the error message if it dies.
_TAIL_LINES = 40
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

#: Settings the gateway reads from the environment: the names its own
#: settings parser looks up, so a new setting is never missed here.
_GATEWAY_VARIABLES = frozenset(environment_variables())


class ServiceError(GatewayError):
    """A service of the system under test did not start."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="suite_service_failed")


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the suite sends its requests."""

    #: The gateway's base URL, ``http://host:port/v1``.
    gateway_url: str
    #: The simulator behind it (base URL with ``/v1``), when the suite has one:
    #: the baseline of the overhead, and the log of upstream calls.
    sim_url: str | None = None
    #: The simulator's answer length (for the exact-content check).
    sim_tokens: int | None = None


class Service:
    """One child process and the task that reads its output."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read_output(self) -> None:
        """Keep the pipe drained for the whole life of the process (a full
        pipe would block its writes), noting the ``listening on`` line."""
        stream = self.process.stdout
        assert stream is not None
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            if not self.url.done() and (match := _LISTENING.search(text)):
                self.url.set_result(match.group(1))
        if not self.url.done():
            self.url.set_exception(
                ServiceError(f"{self.name} exited before listening:\n" + "\n".join(self.tail))
            )

    async def stop(self) -> None:
        process = self.process
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@asynccontextmanager
async def service(name: str, module: str, args: list[str], env: Mapping[str, str]) -> AsyncIterator[str]:
    """``python -m module args`` until it prints its URL; yields the URL."""
    async with started_service(name, module, args, env) as child:
        yield child.url.result()


@asynccontextmanager
async def started_service(
    name: str,
    module: str,
    args: list[str],
    env: Mapping[str, str],
    *,
    prefix: Sequence[str] = (),
) -> AsyncIterator[Service]:
    """``[prefix...] python -m module args`` until it prints its URL; yields
    the running Service (its process too: the benchmarks read its CPU and
    memory). ``prefix`` is a launcher such as ``taskset -c 1``."""
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", module, *args,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    child = Service(name, process)
    reader = asyncio.create_task(child.read_output(), name=f"{name} output")
    try:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                url = await child.url
        except TimeoutError as exc:
            raise ServiceError(f"{name} did not listen within {START_TIMEOUT_S:g} s") from exc
        del url  # waited for; callers read child.url
        yield child
    finally:
        await child.stop()
        await reader  # EOF follows the exit: the reader ends by itself
        if child.url.done() and not child.url.cancelled():
            child.url.exception()  # retrieved: no "exception was never retrieved"


def clean_environment(is_setting: Callable[[str], bool]) -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not is_setting(name)}


@asynccontextmanager
async def local_system(config: SuiteConfig) -> AsyncIterator[Endpoints]:
    """The simulator and a gateway in front of it, each in its own process."""
    sim = config.sim
    sim_args = [
        "--host", "127.0.0.1", "--port", "0",
        "--ttft-ms", str(sim.ttft_ms), "--ttft-jitter-ms", str(sim.ttft_jitter_ms),
        "--itl-ms", str(sim.itl_ms), "--itl-jitter-ms", str(sim.itl_jitter_ms),
        "--tokens", str(sim.tokens), "--max-concurrency", str(sim.max_concurrency),
        "--seed", str(config.load.seed),
    ]
    async with AsyncExitStack() as stack:
        sim_origin = await stack.enter_async_context(
            service(
                "upstream-sim", "gateway.sim", sim_args,
                clean_environment(lambda name: name.startswith("SIM_")),
            )
        )
        gateway_env = clean_environment(_GATEWAY_VARIABLES.__contains__) | {
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": "0",
            "UPSTREAM_URL": sim_origin + "/v1",
            # The production path: multiplexed streams, a reset is RST_STREAM.
            # `--gateway-env UPSTREAM_PROTOCOL=http1` measures the HTTP/1.1
            # path instead (what vLLM and Ollama speak); the tests run both.
            "UPSTREAM_PROTOCOL": "h2c",
            "LOG_LEVEL": "warning",
            # Nothing is in flight when the suite stops the gateway.
            "DRAIN_TIMEOUT_S": "1",
            **dict(config.gateway_env),
        }
        gateway_origin = await stack.enter_async_context(
            service("gateway", "gateway", [], gateway_env)
        )
        yield Endpoints(
            gateway_url=gateway_origin + "/v1", sim_url=sim_origin + "/v1", sim_tokens=sim.tokens
        )
