"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from ssl import SSLContext

import pytest

from gateway.sim import SimProfile, SimServer

#: Under CI=true a skipped test fails the run (tests/ci_skips.py).
pytest_plugins = ["tests.ci_skips"]

#: The simulator for tests: fast and jitter-free (exact bytes matter, exact timings do not).
FAST_SIM_PROFILE = SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0)

SimFactory = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    """``await sim_factory(profile, ssl=None)``: a started simulator on
    127.0.0.1 and a free port, closed (every connection and task) at the end."""
    servers: list[SimServer] = []

    async def start(
        profile: SimProfile = FAST_SIM_PROFILE, *, ssl: SSLContext | None = None
    ) -> SimServer:
        server = SimServer(profile)
        await server.start(ssl=ssl)
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.aclose()


@pytest.fixture
async def sim(sim_factory: SimFactory) -> SimServer:
    """A started simulator with the fast profile."""
    return await sim_factory()
