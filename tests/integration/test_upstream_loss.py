"""An HTTP/1.1 upstream connection lost under many coalesced subscribers:
the one upstream call breaks off mid-body, and every subscriber -- OpenAI and
native alike -- ends with the in-stream error after the same tokens, none
with ``[DONE]`` or ``done``. (Over HTTP/2 the same loss is a GOAWAY or a dead
connection: the h2 client's tests.)"""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.sim.content import answer_tokens
from tests.integration.conftest import HELD_SIM, subscribed, upstream_held
from tests.integration.sse_frames import FrameReader, native_text, openai_text
from tests.integration.test_gateway_errors import assert_still_serving

PROMPT = "lost together [sim kill_after=3]"
SUBSCRIBERS = 20


async def test_every_coalesced_subscriber_gets_the_in_stream_error(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM, upstream_protocol="http1")
    chat = {"model": "sim", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    async with aiohttp.ClientSession() as http:

        async def one(path: str) -> list:
            async with http.post(gateway.v1 + path, json=chat) as resp:
                assert resp.status == 200
                return await FrameReader(resp).rest()

        paths = ["/chat/completions", "/stream"] * (SUBSCRIBERS // 2)
        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(one(path)) for path in paths]
                await subscribed(gateway, SUBSCRIBERS)
        results = [task.result() for task in tasks]

        (record,) = gateway.sim.log.records  # one upstream call for all
        assert record.tokens_sent == 3
        # The same text for every subscriber: what arrived before the
        # connection broke (the last token may be lost with the connection:
        # a TCP reset discards what the gateway had not read yet).
        answer = openai_text(results[0])
        assert answer == "".join(answer_tokens(chat["messages"], 3))[: len(answer)]
        for path, frames in zip(paths, results, strict=True):
            if path == "/stream":
                assert native_text(frames) == answer
                assert frames[-1].event == "error"
                assert frames[-1].json()["code"] == "upstream_connection_lost"
                assert all(frame.event != "done" for frame in frames)
            else:
                assert openai_text(frames) == answer
                assert frames[-1].json()["error"]["code"] == "upstream_connection_lost"
                assert all(frame.data != "[DONE]" for frame in frames)
        async with asyncio.timeout(5):
            await gateway.state.registry.wait_idle()
        assert gateway.state.active_streams == 0 and gateway.state.admission.inflight == 0
        assert gateway.state.router.upstreams[0].transport.connection_count() == 0
        await assert_still_serving(http, gateway.v1)
