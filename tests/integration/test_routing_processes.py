"""``python -m gateway`` with GATEWAY_CONFIG, as processes: simulator
processes as the upstreams, and bad routing files refused at start."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.integration.sse_frames import FrameReader, openai_text
from tests.integration.test_routing import expected, only_pings_then_the_answer
from tests.integration.test_shutdown import chat, gateway_process

SIM_LISTENING = re.compile(rb"upstream-sim listening on (http://127\.0\.0\.1:\d+)\n")


@asynccontextmanager
async def sim_process(*flags: str) -> AsyncIterator[str]:
    """``python -m gateway.sim`` on a free port; yields its base URL (``.../v1``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim", "--port", "0", "--ttft-ms", "5",
        "--ttft-jitter-ms", "0", "--itl-ms", "1", "--itl-jitter-ms", "0", "--tokens", "16",
        *flags,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        match = SIM_LISTENING.fullmatch(line)
        assert match, line
        yield match.group(1).decode() + "/v1"
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def requests_seen(http: aiohttp.ClientSession, sim_url: str) -> list[dict[str, object]]:
    async with http.get(sim_url.removesuffix("/v1") + "/admin/requests") as resp:
        return (await resp.json())["requests"]  # type: ignore[no-any-return]


async def test_a_routing_file_with_simulator_processes(tmp_path: Path) -> None:
    async with sim_process("--fail-status", "503") as broken, sim_process() as backup:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[[upstream]]\nname = "broken"\nurl = "{broken}"\nprotocol = "h2c"\n'
            f'api_key_env = "BROKEN_KEY"\nmodels = ["sim"]\n\n'
            f'[[upstream]]\nname = "backup"\nurl = "{backup}"\nprotocol = "h2c"\n'
            f'priority = 1\n\n[routing]\ncircuit_failures = 2\n'
        )
        # No UPSTREAM_URL or UPSTREAM_PROTOCOL: the file names each upstream's.
        async with gateway_process(
            "", protocol="", GATEWAY_CONFIG=str(config), BROKEN_KEY="sk-broken"
        ) as gateway, aiohttp.ClientSession() as http:
            for n in range(5):
                async with http.post(gateway.url + "/v1/chat/completions",
                                     json=chat(f"processes {n}")) as resp:
                    frames = await FrameReader(resp).rest()
                assert openai_text(frames) == expected(f"processes {n}")
                assert only_pings_then_the_answer(frames)
            async with http.post(gateway.url + "/v1/chat/completions",
                                 json={**chat("x"), "model": "sim"}) as resp:
                assert resp.status == 200
            seen_broken = await requests_seen(http, broken)
            seen_backup = await requests_seen(http, backup)
            gateway.process.terminate()
    # The key went to the upstream that names it, and only there.
    # (How many reach each depends on when the breaker's cooldown lets a
    # probe through on a loaded machine: at least the two that opened it,
    # and every answer from the backup.)
    assert len(seen_broken) >= 2 and {(r["status"], r["authorization"]) for r in seen_broken} == {
        (503, True)}
    assert len(seen_backup) >= 6 and {r["authorization"] for r in seen_backup} == {False}
    assert all("sk-broken" not in str(line) for line in gateway.log)


BAD_FILES = [
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nweight = 0\n',
     "line 4: upstream[0].weight: must be a number > 0"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nmodles = ["x"]\n',
     "line 4: upstream[0].modles: unknown field"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\napi_key_env = "NOT_SET_ANYWHERE"\n',
     "line 4: upstream[0].api_key_env: the environment has no NOT_SET_ANYWHERE"),
    ('[[upstream]\nname = "a"\n', "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
async def test_a_bad_routing_file_is_one_line_and_exit_status_2(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "GATEWAY_CONFIG": str(config), "GATEWAY_PORT": "0"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2
    assert stdout == b""
    line = stderr.decode()
    assert line.count("\n") == 1 and line.endswith("\n"), line
    assert line.startswith(f"llm-stream-gateway: GATEWAY_CONFIG: {config}: ")
    assert message in line, line
