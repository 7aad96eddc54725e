"""Exchange-log fixtures: a PostgreSQL server per session, a database per test,
and the gateway started on either store."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.postgres_fixture import PG_BIN, PostgresServer, running_postgres
from tests.integration.sse_frames import FrameReader

_databases = itertools.count(1)

#: A ceiling, never a wait: the writer is told when its batch is in.
WRITTEN_WITHIN_S = 10.0


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if PG_BIN is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty exchange log of each kind: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/exchanges.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"exchanges_{next(_databases)}")


def chat(prompt: str, *, stream: bool = True, model: str = "sim") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


async def stream_text(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> tuple[str, str]:
    """POST a streaming chat; returns (request id, the answer's text)."""
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        frames = await FrameReader(resp).rest()
        request_id = resp.headers["X-Request-Id"]
    assert frames[-1].data == "[DONE]"
    text = "".join(
        choice["delta"].get("content") or ""
        for frame in frames
        if frame.data and frame.data != "[DONE]"
        for choice in frame.json().get("choices", [])
    )
    return request_id, text


async def written(writer: Any, total: int) -> None:
    async with asyncio.timeout(WRITTEN_WITHIN_S):
        await writer.wait_written(total)
