"""``python -m gateway.sim`` as its own process, as bin/upstream-sim runs it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import aiohttp
import pytest

LISTENING = re.compile(rb"upstream-sim listening on (http://127\.0\.0\.1:(\d+))\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_prints_its_address_serves_and_stops_on_signal(signum: signal.Signals) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim", "--port", "0", "--ttft-ms", "1", "--tokens", "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIM_ITL_MS": "1"},
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        match = LISTENING.fullmatch(line)
        assert match, line
        async with aiohttp.ClientSession() as session, session.post(
            match.group(1).decode() + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        ) as response:
            assert (await response.json())["usage"]["completion_tokens"] == 2
    finally:
        if process.returncode is None:
            process.send_signal(signum)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr
    assert stdout == b"" and stderr == b""  # exactly one line, nothing else


async def test_bad_knob_is_a_usage_error() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sim", "--tokens", "many",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 2
    assert b"tokens" in stderr
