"""``python -m gateway`` as a user first meets it: ``--help``, a busy port,
no upstream configured (the simulator, said loudly), ``--require-upstream``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from yarl import URL

from gateway.__main__ import environment_variables
from gateway.connection import listen_url

START_TIMEOUT_S = 15.0


def _environment(**overrides: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in environment_variables()}
    env.pop("GATEWAY_CONFIG", None)
    return {**env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", **overrides}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=_environment(**env),
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )


def test_help_prints_usage_and_every_variable_and_exits_0_without_starting() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m gateway")
    assert "listening on" not in result.stdout and result.stderr == ""
    assert "docs/configuration.md" in result.stdout
    listed = set(re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", result.stdout.split("environment variables")[1]))
    assert set(environment_variables()) <= listed
    assert "UPSTREAM_URL" in listed and "FIRST_TOKEN_PING_INTERVAL_MS" in listed


def test_bin_gateway_runs_the_gateway_of_the_checkouts_venv() -> None:
    launcher = Path(__file__).resolve().parents[2] / "bin" / "gateway"
    result = subprocess.run(
        [launcher, "--help"], env=_environment(), capture_output=True, text=True, timeout=30,
        check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == _run("--help").stdout


def test_a_busy_port_is_one_line_naming_it_and_exit_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(GATEWAY_PORT=str(port))
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line == (f"llm-stream-gateway: port {port} on 127.0.0.1 is already in use (another "
                    "gateway, or an old one still draining?); choose another with GATEWAY_PORT")


def test_an_address_not_of_this_host_is_one_line_naming_gateway_host() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: its port is not
    # the cause, so GATEWAY_PORT is not the setting to change.
    result = _run(GATEWAY_HOST="192.0.2.1", GATEWAY_PORT="0")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("llm-stream-gateway: address 192.0.2.1 cannot be listened on: ")
    assert line.endswith("; choose another with GATEWAY_HOST"), line


def test_require_upstream_refuses_the_simulator_with_exit_status_2() -> None:
    result = _run("--require-upstream")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "UPSTREAM_URL" in line and "GATEWAY_CONFIG" in line and "simulator" in line
    assert result.stdout == ""


async def test_no_upstream_url_serves_the_simulator_and_says_so_loudly() -> None:
    # A plain Popen, waited for in a thread: its exit status is its own, not
    # asyncio's child watcher's (which reports 255 for a child another
    # waiter in this long-lived test process reaped first).
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "gateway"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_environment(LOG_FORMAT="json"),
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), START_TIMEOUT_S)
        match = re.fullmatch(rb"llm-stream-gateway listening on (http://\S+) \(upstream: simulator\)\n",
                             line)
        assert match, line
        url = match.group(1).decode()
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz") as resp:
                assert resp.status == 200
                assert await resp.json() == {
                    "status": "ready", "upstream": "simulator", "upstreams": {"default": "ok"}
                }
            async with http.get(url + "/stats") as resp:
                assert (await resp.json())["upstream"] == "simulator"
        process.terminate()
        returncode = await asyncio.wait_for(asyncio.to_thread(process.wait), 10)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert returncode == 0, stderr
    first = stderr.splitlines()[0]
    assert first.startswith("llm-stream-gateway: WARNING: no UPSTREAM_URL set: serving the built-in "
                            "SIMULATOR")
    lines = [json.loads(line) for line in stderr.splitlines()[1:]]
    assert {"event": "serving the built-in simulator: no UPSTREAM_URL set", "level": "warning",
            "upstream": "simulator"}.items() <= lines[0].items()


def test_the_listening_url_puts_an_ipv6_address_in_brackets() -> None:
    # "http://::1:8080" is no URL: a client could not reach what it names.
    url = URL(listen_url("::1", 8080))
    assert (str(url), url.host, url.port) == ("http://[::1]:8080", "::1", 8080)
    assert listen_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"


async def test_a_configured_upstream_is_named_configured(gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as resp:
            assert await resp.json() == {
                "status": "ready", "upstream": "configured", "upstreams": {"default": "ok"}
            }
        async with http.get(gateway.url + "/stats") as resp:
            assert (await resp.json())["upstream"] == "configured"
