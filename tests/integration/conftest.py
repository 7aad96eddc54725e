"""Gateway fixtures: a real gateway on a real socket, in front of the simulator."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.sim.profile import SimProfile
from gateway.state import STATE, GatewayState
from tests.integration.exchange_fixtures import postgres, store_url  # noqa: F401 (fixtures)

#: Fast, jitter-free upstream: exact timings do not matter, exact bytes do.
FAST_SIM = SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0, tokens=16)

#: The simulator generating one answer at a time (``max_concurrency=1``), so
#: that ``upstream_held`` can keep every model request waiting upstream.
HELD_SIM = dataclasses.replace(FAST_SIM, max_concurrency=1)

#: The upstream protocols a gateway test can run over: HTTP/2 with prior
#: knowledge (what hosted APIs negotiate) and HTTP/1.1 (what ``auto`` picks for
#: every plain ``http://`` URL: vLLM, Ollama, llama.cpp, TGI).
UPSTREAM_PROTOCOLS = ("h2c", "http1")

#: Runs a gateway test once per upstream protocol (the simulator speaks both
#: on one port); a test without it runs over h2c.
both_protocols = pytest.mark.parametrize("upstream_protocol", UPSTREAM_PROTOCOLS)


@dataclasses.dataclass
class Gateway:
    url: str
    state: GatewayState
    sim: Any
    #: The upstream protocol it talks to the simulator over.
    protocol: str = "h2c"

    @property
    def cancel_outcome(self) -> str:
        """How the simulator logs the gateway cancelling: an RST_STREAM over
        HTTP/2, the connection closed over HTTP/1.1."""
        return "disconnect" if self.protocol == "http1" else "reset"

    @property
    def v1(self) -> str:
        return self.url + "/v1"


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def upstream_protocol() -> str:
    """The gateway's ``UPSTREAM_PROTOCOL`` in tests; ``both_protocols`` overrides it."""
    return "h2c"


@pytest.fixture
async def gateway_factory(sim_factory, upstream_protocol: str) -> AsyncIterator[GatewayFactory]:
    """``await gateway_factory(sim_profile=..., **settings)``: simulator +
    gateway over ``upstream_protocol``; both are closed at the end of the test."""
    stacks = []

    async def start(sim_profile: SimProfile = FAST_SIM, **overrides: Any) -> Gateway:
        sim = await sim_factory(sim_profile)
        overrides.setdefault("upstream_protocol", upstream_protocol)
        settings = Settings(host="127.0.0.1", port=0, upstream_url=sim.url, **overrides)
        context = running_gateway(settings)
        app, url = await context.__aenter__()
        stacks.append(context)
        return Gateway(url=url, state=app[STATE], sim=sim, protocol=settings.upstream_protocol)

    yield start
    for context in reversed(stacks):
        await context.__aexit__(None, None, None)


@pytest.fixture
async def gateway(gateway_factory) -> Gateway:
    return await gateway_factory()


@asynccontextmanager
async def upstream_held(gateway: Gateway) -> AsyncIterator[None]:
    """Hold the simulator's only generation slot (the gateway must run on
    ``HELD_SIM``): requests reach the upstream and wait there, their streams
    alive and joinable, until the block ends. A burst is then one upstream
    call however slowly its clients arrive on a loaded machine."""
    limiter = gateway.sim.app.limiter
    assert limiter.limit == 1, "start the gateway with sim_profile=HELD_SIM"
    async with limiter.slot():
        yield


async def until(predicate: Callable[[], bool]) -> None:
    """Until ``predicate()`` holds (at most 10 s), re-checked every few
    milliseconds: for a gauge that has no event of its own (the registry's
    subscribers, its remembered failures)."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - a gauge: no event to wait on
            await asyncio.sleep(0.005)


async def subscribed(gateway: Gateway, count: int) -> None:
    """Until ``count`` subscriptions are open in the gateway's registry."""
    await until(lambda: gateway.state.registry.statistics().subscribers == count)
