"""Gateway fixtures: a real gateway on a real socket, in front of the simulator."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.sim.profile import SimProfile
from gateway.state import STATE, GatewayState
from tests.integration.exchange_fixtures import postgres, store_url  # noqa: F401 (fixtures)

#: Fast, jitter-free upstream: exact timings do not matter, exact bytes do.
FAST_SIM = SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0, tokens=16)


@dataclasses.dataclass
class Gateway:
    url: str
    state: GatewayState
    sim: Any

    @property
    def v1(self) -> str:
        return self.url + "/v1"


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(sim_factory) -> AsyncIterator[GatewayFactory]:
    """``await gateway_factory(sim_profile=..., **settings)``: simulator +
    gateway over h2c; both are closed at the end of the test."""
    stacks = []

    async def start(sim_profile: SimProfile = FAST_SIM, **overrides: Any) -> Gateway:
        sim = await sim_factory(sim_profile)
        settings = Settings(
            host="127.0.0.1",
            port=0,
            upstream_url=sim.url,
            upstream_protocol="h2c",
            **overrides,
        )
        context = running_gateway(settings)
        app, url = await context.__aenter__()
        stacks.append(context)
        return Gateway(url=url, state=app[STATE], sim=sim)

    yield start
    for context in reversed(stacks):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def gateway(gateway_factory) -> Gateway:
    return await gateway_factory()
