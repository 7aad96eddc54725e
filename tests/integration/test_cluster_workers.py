"""``GATEWAY_WORKERS=N``: N processes on one port, one coalescing namespace.

The supervisor (``python -m gateway``) starts the workers; each listens on
the same port with SO_REUSEPORT and is a full cluster member. Without
REDIS_URL, more than one worker is a one-line start-up error (status 2).
SIGTERM drains every worker: a stream in flight finishes, status 0. A worker
that exits unasked is started again on its own, until workers exit too often.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.cluster.directory import MEMBERS
from gateway.cluster.peer import METRICS_PATH
from gateway.sim.content import answer_tokens
from gateway.workers import GIVE_UP_EXITS, RESTART_DELAY_S
from tests.integration.cluster_fixture import REDIS_SERVER, RedisServer, running_member, running_redis
from tests.integration.conftest import FAST_SIM
from tests.integration.metrics_scrape import Scrape
from tests.integration.nginx_fixture import free_port
from tests.integration.sse_frames import FrameReader, native_text

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def chat(prompt: str) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}


def expected(prompt: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with running_redis(tmp_path / "redis") as server:
        yield server


async def test_several_workers_without_redis_is_a_one_line_start_up_error():
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"GATEWAY_WORKERS": "3"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert stdout == b""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and "GATEWAY_WORKERS" in lines[0] and "REDIS_URL" in lines[0]


async def gateway_run(env: Mapping[str, str]) -> tuple[int | None, bytes, bytes]:
    """``python -m gateway`` that is expected to stop by itself (a start-up
    error): its status and output."""
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await gateway.communicate()
    return gateway.returncode, stdout, stderr


async def test_a_port_other_workers_hold_is_in_use_for_a_second_supervisor(sim_factory, redis):
    """SO_REUSEPORT lets any number of sockets share a port: a second set of
    workers must still find it taken (status 1, as for one process: the
    port may free itself), not split the first one's traffic."""
    sim = await sim_factory(FAST_SIM)
    async with running_member(sim.url, redis.url, {"GATEWAY_WORKERS": "2"}) as gateway:
        port = int(gateway.url.rsplit(":", 1)[1])
        env = {**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
               "GATEWAY_WORKERS": "2", "REDIS_URL": redis.url, "UPSTREAM_URL": sim.url}
        status, stdout, stderr = await gateway_run(env)
    assert status == 1
    assert stdout == b""
    assert stderr.decode().splitlines() == [
        f"llm-stream-gateway: port {port} on 127.0.0.1 is already in use (another gateway, or an "
        "old one still draining?); choose another with GATEWAY_PORT"
    ]


async def test_a_busy_internal_port_is_a_one_line_start_up_error(sim_factory, redis):
    sim = await sim_factory(FAST_SIM)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        env = {**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0",
               "REDIS_URL": redis.url, "UPSTREAM_URL": sim.url,
               "CLUSTER_ADVERTISE_URL": f"http://127.0.0.1:{busy}"}
        status, stdout, stderr = await gateway_run(env)
    assert status == 1
    assert stdout == b""
    assert stderr.decode().splitlines() == [
        f"llm-stream-gateway: port {busy} on 127.0.0.1 is already in use (another gateway, or an "
        "old one still draining?); choose another with CLUSTER_ADVERTISE_URL (each worker adds "
        "its index)"
    ]


async def test_each_worker_serves_its_own_metrics_at_its_internal_address(sim_factory, redis):
    """A scrape of the shared port reaches whichever worker the kernel
    picks; each worker's internal address serves that worker's metrics,
    and theirs add up to every request served."""
    sim = await sim_factory(FAST_SIM)
    async with running_member(sim.url, redis.url, {"GATEWAY_WORKERS": "2"}) as gateway:
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: both workers
        async with aiohttp.ClientSession(connector=connector) as http:
            internal: dict[int, str] = {}
            async with asyncio.timeout(30):
                while len(internal) < 2:
                    async with http.get(gateway.url + "/stats") as resp:
                        stats = await resp.json()
                    internal[stats["process"]["worker"]] = stats["cluster"]["advertise_url"]
            for n in range(20):
                body = {**chat(f"counted {n}"), "stream": False}
                async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
            served = []
            for url in internal.values():
                async with http.get(url + METRICS_PATH) as resp:
                    assert resp.status == 200
                    scrape = Scrape.parse(await resp.text())
                served.append(scrape.value("gateway_requests_total", api="openai", outcome="ok"))
    assert sum(served) == 20, served


async def test_workers_share_the_port_and_coalesce_and_drain_on_sigterm(sim_factory, redis):
    sim = await sim_factory(FAST_SIM)
    async with running_member(sim.url, redis.url, {"GATEWAY_WORKERS": "3",
                                                   "DRAIN_TIMEOUT_S": "10"}) as gateway:
        # Each worker prints its own line once it listens: wait for all three.
        try:
            async with asyncio.timeout(30):
                while sum("listening on" in line for line in gateway.output) < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError("\n".join(gateway.output)) from None
        # New connections, so SO_REUSEPORT spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            seen: dict[int, int] = {}
            for _ in range(60):
                async with http.get(gateway.url + "/stats") as resp:
                    process = (await resp.json())["process"]
                assert process["workers"] == 3
                seen[process["worker"]] = process["pid"]
            assert sorted(seen) == [0, 1, 2]
            assert len(set(seen.values())) == 3 and gateway.pid not in seen.values()

            prompt = "one burst, three workers [sim ttft_ms=2000]"

            async def one() -> str:
                async with http.post(gateway.url + "/v1/stream", json=chat(prompt)) as resp:
                    return native_text(await FrameReader(resp).rest())

            assert await asyncio.gather(*(one() for _ in range(30))) == [expected(prompt)] * 30
            assert len(sim.log.records) == 1

            # SIGTERM to the supervisor with a stream in flight: it finishes.
            slow = "drained [sim itl_ms=50 tokens=20]"
            resp = await http.post(gateway.url + "/v1/stream", json=chat(slow))
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
            gateway.service.process.send_signal(signal.SIGTERM)
            frames = await reader.rest()
            resp.release()
            assert native_text(frames) == expected(slow, 20)
            assert frames[-1].event == "done"
            async with asyncio.timeout(15):
                assert await gateway.service.process.wait() == 0


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


async def test_a_killed_supervisor_leaves_no_worker_behind(sim_factory, redis):
    sim = await sim_factory(FAST_SIM)
    async with running_member(sim.url, redis.url, {"GATEWAY_WORKERS": "2"}) as gateway:
        supervisor = gateway.service.process
        async with asyncio.timeout(30):
            while len(workers := _children(supervisor.pid)) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        supervisor.send_signal(signal.SIGKILL)
        try:
            async with asyncio.timeout(10):
                while any(_alive(pid) for pid in workers):  # noqa: ASYNC110 - other processes
                    await asyncio.sleep(0.05)
        finally:
            # A worker left behind holds the supervisor's stdout open: end it,
            # or the fixture would wait for that pipe forever.
            for pid in workers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is ``port`` (/proc/net/tcp, state 06)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "06":
            count += 1
    return count


async def test_workers_start_on_the_port_a_single_gateway_just_left(sim_factory, redis):
    """A single gateway that closed a keep-alive connection itself (its drain
    closes idle ones) leaves a TIME_WAIT entry on its port for a minute: the
    workers that replace it must still start at once."""
    sim = await sim_factory(FAST_SIM)
    port = str(free_port())
    async with running_member(sim.url, None, {"GATEWAY_PORT": port}) as single:
        async with aiohttp.ClientSession() as http:
            async with http.get(single.url + "/healthz") as resp:
                assert resp.status == 200
            single.service.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await single.service.process.wait() == 0
    assert _time_wait_on(int(port)) > 0
    async with running_member(sim.url, redis.url, {"GATEWAY_WORKERS": "2",
                                                   "GATEWAY_PORT": port}) as gateway:
        async with aiohttp.ClientSession() as http, http.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200


#: ``python -m gateway`` with a kill grace of seconds instead of 10 s, so
#: that a test of the supervisor's kill deadline takes seconds.
QUICK_KILL = ("import sys, gateway.workers as workers; workers.KILL_GRACE_S = {grace}; "
              "from gateway.__main__ import main; sys.exit(main())")


@dataclass
class Supervisor:
    """A supervisor as our child, its stdout and stderr read into ``lines``."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Every worker pid seen, for the clean-up.
    seen: set[int] = field(default_factory=set)

    async def read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self.changed.set()

    async def wait_lines(self, text: str, count: int = 1) -> list[str]:
        """Until ``count`` lines contain ``text`` (a 15 s ceiling)."""
        try:
            async with asyncio.timeout(15):
                while len(found := [line for line in self.lines if text in line]) < count:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.lines)) from None
        return found

    @property
    def url(self) -> str:
        """The shared address, from the first worker's ``listening on`` line."""
        for line in self.lines:
            if match := re.search(r"listening on (http://\S+)", line):
                return match[1]
        raise AssertionError("no worker listens yet")

    def workers(self) -> dict[int, int]:
        """Worker number (1..N) -> pid, of the workers running now."""
        found = {}
        for pid in _children(self.process.pid):
            self.seen.add(pid)
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            index = next((v for v in environ if v.startswith(b"GATEWAY_WORKER_INDEX=")), None)
            if index is not None:  # None: forked, not yet a worker
                found[int(index.split(b"=")[1]) + 1] = pid
        return found

    async def exit_status(self) -> int:
        try:
            async with asyncio.timeout(20):
                return await self.process.wait()
        except TimeoutError:
            raise AssertionError("the supervisor is still running:\n"
                                 + "\n".join(self.lines)) from None


@asynccontextmanager
async def supervisor(env: Mapping[str, str], workers: int,
                     kill_grace: float = 3.0) -> AsyncIterator[Supervisor]:
    """A supervisor once ``workers`` of its workers listen. At the end, it
    and every worker it had are gone (SIGKILL for any left)."""
    async with started_supervisor(env, kill_grace) as running:
        await running.wait_lines("listening on", workers)
        running.workers()
        yield running


@asynccontextmanager
async def started_supervisor(env: Mapping[str, str],
                             kill_grace: float = 3.0) -> AsyncIterator[Supervisor]:
    """A supervisor just started, its output read. At the end, it and every
    worker it had are gone (SIGKILL for any left)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", QUICK_KILL.format(grace=kill_grace), env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    running = Supervisor(process)
    reader = asyncio.create_task(running.read(), name="supervisor output")
    try:
        yield running
    finally:
        if process.returncode is None:
            running.workers()
            process.kill()
            await process.wait()
        for pid in running.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            await reader  # EOF once every holder of the pipe is gone


def supervisor_env(sim_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("GATEWAY_", "UPSTREAM_", "CLUSTER_", "REDIS_"))}
    return env | {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", "UPSTREAM_URL": sim_url,
                  "UPSTREAM_PROTOCOL": "h2c", "REDIS_URL": redis_url, "LOG_LEVEL": "warning",
                  "LOG_FORMAT": "json",
                  "DRAIN_TIMEOUT_S": "0.5", **settings}


async def test_a_worker_that_does_not_stop_is_killed_at_the_deadline(sim_factory, redis):
    """SIGTERM, and a worker that cannot act on it (stopped): past the drain
    timeout plus the kill grace it is SIGKILLed, and the supervisor exits."""
    sim = await sim_factory(FAST_SIM)
    env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2")
    async with supervisor(env, 2) as running:
        hung = running.workers()[2]
        os.kill(hung, signal.SIGSTOP)
        running.process.send_signal(signal.SIGTERM)
        assert await running.exit_status() == 1, "\n".join(running.lines)
        assert not _alive(hung)
        assert any("worker 2 of 2" in line and "killing it" in line for line in running.lines)


@contextmanager
def second_internal_port_busy() -> Iterator[int]:
    """A free port P whose next one, P + 1, is held by a listener: with
    CLUSTER_ADVERTISE_URL on P, worker 2's internal listener cannot start
    (status 1, at once, every time) while worker 1's can."""
    for _ in range(100):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            held = holder.getsockname()[1]
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", held - 1))
                except OSError:
                    continue
            holder.listen()
            yield held - 1
            return
    raise AssertionError("no free port below a free port")


async def members_listed(redis_url: str, count: int) -> None:
    """Until Redis lists ``count`` members (a 15 s ceiling): each worker has
    then made its first write. A stop during that write can leave a worker
    unable to exit (redis-py may swallow the cancellation), so a test stops
    a worker only once it is listed."""
    client = Redis.from_url(redis_url)
    try:
        async with asyncio.timeout(15):
            while await client.zcard(MEMBERS) < count:  # noqa: ASYNC110 - Redis's state
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def restart_delays(lines: list[str]) -> list[str]:
    return re.findall(r"restarting it in (\S+) s", "\n".join(lines))


async def test_a_crash_next_to_a_hung_worker_still_ends_the_supervisor(sim_factory, redis):
    """Worker 1 hung (stopped), worker 2 failing at every start: giving up
    stops worker 1, which cannot drain, and the deadline kills it."""
    sim = await sim_factory(FAST_SIM)
    with second_internal_port_busy() as port:
        env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2",
                             CLUSTER_ADVERTISE_URL=f"http://127.0.0.1:{port}")
        async with supervisor(env, 1, kill_grace=1.0) as running:
            hung = running.workers()[1]
            os.kill(hung, signal.SIGSTOP)
            assert await running.exit_status() == 1, "\n".join(running.lines)
            assert not _alive(hung)
    assert sum("giving up" in line for line in running.lines) == 1
    assert any("worker 1 of 2 still running" in line for line in running.lines)


async def test_a_killed_worker_is_restarted_while_the_other_serves_on(sim_factory, redis):
    """SIGKILL to one worker: the supervisor starts another with the same
    index; the other worker, and a stream on it, go on untouched."""
    sim = await sim_factory(FAST_SIM)
    env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2")
    async with supervisor(env, 2) as running:
        before = running.workers()
        # One keep-alive connection (the trace counts connections made):
        # /stats says which worker holds it, and the stream runs on it too.
        connections: list[object] = []

        async def connected(*args: object) -> None:
            connections.append(args)

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(connected)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         trace_configs=[trace]) as http:
            async with http.get(running.url + "/stats") as resp:
                process = (await resp.json())["process"]
            serving = process["worker"] + 1
            other = 3 - serving
            assert before[serving] == process["pid"]
            prompt = "through a restart [sim itl_ms=50 tokens=20]"
            resp = await http.post(running.url + "/v1/stream", json=chat(prompt))
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
            os.kill(before[other], signal.SIGKILL)
            [line] = await running.wait_lines("exited with status")
            assert line == (f"llm-stream-gateway: worker {other} of 2 (pid {before[other]}) "
                            f"exited with status -9; restarting it in {RESTART_DELAY_S:g} s")
            frames = await reader.rest()
            resp.release()
            assert native_text(frames) == expected(prompt, 20)
            assert frames[-1].event == "done"
            assert len(connections) == 1

        listening = await running.wait_lines("listening on", 3)
        assert f"worker {other} of 2" in listening[2]
        await members_listed(redis.url, 3)  # the killed one's entry stays until its lease ends
        after = running.workers()
        assert after[serving] == before[serving]
        assert after[other] != before[other]
        # New connections reach both, the replacement included.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(15):
            seen: dict[int, int] = {}
            while len(seen) < 2:
                async with http.get(running.url + "/stats") as resp:
                    process = (await resp.json())["process"]
                seen[process["worker"] + 1] = process["pid"]
        assert seen == after
        assert running.process.returncode is None
        running.process.send_signal(signal.SIGTERM)
        assert await running.exit_status() == 0, "\n".join(running.lines)


async def test_a_worker_that_keeps_failing_makes_the_supervisor_give_up(sim_factory, redis):
    """Worker 2 fails at every start (its internal port is taken): restarted
    with a growing wait until more than GIVE_UP_EXITS exits, then worker 1
    drains and the supervisor exits 1 for Restart=on-failure."""
    sim = await sim_factory(FAST_SIM)
    with second_internal_port_busy() as port:
        env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2",
                             CLUSTER_ADVERTISE_URL=f"http://127.0.0.1:{port}")
        async with supervisor(env, 1) as running:
            healthy = running.workers()[1]
            assert await running.exit_status() == 1, "\n".join(running.lines)
            assert not _alive(healthy)
    exits = [line for line in running.lines if "exited with status" in line]
    assert len(exits) == GIVE_UP_EXITS + 1, running.lines
    assert all(line.startswith("llm-stream-gateway: worker 2 of 2 (pid ") for line in exits)
    assert all("exited with status 1; " in line for line in exits)
    assert restart_delays(exits) == [f"{RESTART_DELAY_S * 2 ** n:g}" for n in range(GIVE_UP_EXITS)]
    assert "giving up: stopping the others" in exits[-1]
    assert not any("killing it" in line for line in running.lines)  # worker 1 drained


#: A value only a worker's start can judge: asyncpg refuses the option before
#: any I/O, so every start stops on it (status 2), the database up or not.
REFUSED_EXCHANGE_LOG_URL = "postgresql://gateway@127.0.0.1:1/exchanges?sslmode=bogus"


async def test_a_worker_stopped_by_a_bad_configuration_is_not_restarted(sim_factory, redis):
    """A worker that exits 2 (a bad configuration) would exit 2 again at
    every restart: the supervisor restarts none, stops the others and exits
    2 too, which the systemd unit does not retry (RestartPreventExitStatus=2)
    where status 1 would have it restart the whole set again and again."""
    sim = await sim_factory(FAST_SIM)
    env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2",
                         EXCHANGE_LOG_URL=REFUSED_EXCHANGE_LOG_URL)
    async with started_supervisor(env) as running:
        assert await running.exit_status() == 2, "\n".join(running.lines)
    exits = [line for line in running.lines if "exited with status" in line]
    assert len(exits) == 1, running.lines
    assert re.fullmatch(r"llm-stream-gateway: worker [12] of 2 \(pid \d+\) exited with status 2; "
                        r"a bad configuration, which no restart can fix: stopping the others",
                        exits[0]), exits
    assert not any("restarting it" in line for line in running.lines)


async def test_a_stop_while_a_restart_waits_cancels_it(sim_factory, redis):
    """SIGTERM while worker 2 waits to be restarted: nothing more starts,
    worker 1 drains, status 0 (a worker started after the stop would have
    missed it and been killed at the deadline: status 1)."""
    sim = await sim_factory(FAST_SIM)
    with second_internal_port_busy() as port:
        env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2",
                             CLUSTER_ADVERTISE_URL=f"http://127.0.0.1:{port}")
        async with supervisor(env, 1) as running:
            await running.wait_lines("restarting it in", 3)
            running.process.send_signal(signal.SIGTERM)
            assert await running.exit_status() == 0, "\n".join(running.lines)
    assert len([line for line in running.lines if "exited with status" in line]) == 3
    assert not any("killing it" in line for line in running.lines)


def _first_child(pid: int) -> list[int]:
    """Every child of ``pid``, once it has one (polled every 0.5 ms, without
    yielding to the loop: the signal must land while the supervisor is
    still starting workers; at most 30 s)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 30
    while not (children := path.read_text().split()):
        assert time.monotonic() < deadline, "the supervisor started no worker"
        time.sleep(0.0005)
    return [int(child) for child in children]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_stop_while_workers_are_starting_stops_every_worker(sim_factory, redis, stop):
    """Also a worker the signal reaches before its own handler is in place:
    it dies of it, which counts as stopped (status 0), whatever the signal."""
    sim = await sim_factory(FAST_SIM)
    env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="4")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", QUICK_KILL.format(grace=3.0), env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    running = Supervisor(process)
    try:
        running.seen.update(_first_child(process.pid))
        process.send_signal(stop)
        assert await running.exit_status() == 0, "\n".join(running.lines)
    finally:
        if process.returncode is None:
            running.seen.update(_children(process.pid))
            process.kill()
            await process.wait()
        for pid in running.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_worker_that_stops_on_its_own_is_restarted(sim_factory, redis):
    """SIGTERM to one worker: it drains and exits 0, which the supervisor
    did not ask for. Running on with one worker fewer would leave the host
    short: it is started again, and a stop later still ends with status 0."""
    sim = await sim_factory(FAST_SIM)
    env = supervisor_env(sim.url, redis.url, GATEWAY_WORKERS="2")
    async with supervisor(env, 2) as running:
        before = running.workers()
        await members_listed(redis.url, 2)
        os.kill(before[1], signal.SIGTERM)
        [line] = await running.wait_lines("exited with status")
        assert line == (f"llm-stream-gateway: worker 1 of 2 (pid {before[1]}) exited with "
                        f"status 0; restarting it in {RESTART_DELAY_S:g} s")
        listening = await running.wait_lines("listening on", 3)
        assert "worker 1 of 2" in listening[2]
        await members_listed(redis.url, 2)  # the stopped one left the list
        after = running.workers()
        assert after[2] == before[2] and after[1] != before[1]
        running.process.send_signal(signal.SIGTERM)
        assert await running.exit_status() == 0, "\n".join(running.lines)


async def test_sighup_drains_every_worker(sim_factory, redis):
    """A closed terminal or a reload habit sends SIGHUP: the same drain as
    SIGTERM in every worker (a stream in flight finishing on SIGHUP is
    test_shutdown.py's), status 0."""
    sim = await sim_factory(FAST_SIM)
    settings = {"GATEWAY_WORKERS": "2", "LOG_LEVEL": "info", "LOG_FORMAT": "json"}
    async with running_member(sim.url, redis.url, settings) as gateway:
        async with asyncio.timeout(30):
            while sum("listening on" in line for line in gateway.output) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        gateway.service.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(15):
            assert await gateway.service.process.wait() == 0, "\n".join(gateway.output)
        draining = [json.loads(line) for line in gateway.output
                    if '"signal":"SIGHUP"' in line and '"draining"' in line]
        # Every line of a worker says which one wrote it.
        assert sorted(line["worker"] for line in draining) == [0, 1]
