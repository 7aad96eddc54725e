"""The edges of the HTTP face, each with its exact status and body: the body
limit from both sides and without a Content-Length, bytes that are not
UTF-8, who shares an answer under each COALESCE_SCOPE and without configured
keys, and Last-Event-ID once the stream it names has finished."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.sim.content import answer_tokens
from tests.integration.conftest import FAST_SIM, HELD_SIM, subscribed, upstream_held
from tests.integration.sse_frames import FrameReader, native_text, openai_text
from tests.integration.test_gateway_errors import assert_still_serving

LIMIT = 4096
JSON = {"Content-Type": "application/json"}
TOO_LARGE = {"error": {
    "message": f"request body is over the {LIMIT}-byte limit",
    "type": "invalid_request_error",
    "code": "payload_too_large",
}}


def body_of_size(size: int, prompt: str = "sized") -> bytes:
    """A valid chat request of exactly ``size`` bytes (padded in the content)."""
    def encode(pad: int) -> bytes:
        chat = {"model": "sim", "stream": False,
                "messages": [{"role": "user", "content": prompt + " " + "x" * pad}]}
        return json.dumps(chat).encode()

    bare = len(encode(0))
    body = encode(size - bare)
    assert len(body) == size
    return body


def content_of(body: bytes) -> str:
    return json.loads(body)["messages"][0]["content"]


def answer(content: str, tokens: int = FAST_SIM.tokens) -> str:
    return "".join(answer_tokens([{"role": "user", "content": content}], tokens))


async def chunked(body: bytes, piece: int = 1000) -> AsyncIterator[bytes]:
    """The body in pieces, so aiohttp sends it chunked, with no Content-Length."""
    for start in range(0, len(body), piece):
        yield body[start:start + piece]


async def test_a_body_exactly_at_the_limit_is_served(gateway_factory):
    gateway = await gateway_factory(max_body_bytes=LIMIT)
    body = body_of_size(LIMIT, "at the limit")
    async with aiohttp.ClientSession() as http:
        for data in (body, chunked(body)):
            async with http.post(gateway.v1 + "/chat/completions", data=data, headers=JSON) as resp:
                assert resp.status == 200
                reply = await resp.json()
            assert reply["choices"][0]["message"]["content"] == answer(content_of(body))


async def test_one_byte_over_the_limit_is_413_with_or_without_a_length(gateway_factory):
    gateway = await gateway_factory(max_body_bytes=LIMIT)
    body = body_of_size(LIMIT + 1, "over the limit")
    async with aiohttp.ClientSession() as http:
        for how, data in (("Content-Length", body), ("chunked", chunked(body))):
            with capture_logs(processors=[merge_contextvars]) as logs:
                async with http.post(gateway.v1 + "/chat/completions", data=data, headers=JSON) as resp:
                    assert resp.status == 413, how
                    assert await resp.json() == TOO_LARGE, how
                    assert resp.headers["X-Request-Id"]
            assert [line["status"] for line in logs if line["event"] == "request"] == [413], how
        await assert_still_serving(http, gateway.v1)
    assert len(gateway.sim.log.records) == 1  # only the good request went upstream


async def test_a_chunked_body_far_past_the_limit_is_413(gateway_factory):
    """~1 MB sent chunked against a 4 KiB limit: the handler stops at the
    limit and answers 413 (aiohttp discards the rest of the upload, so the
    client sees the answer rather than a reset connection)."""
    gateway = await gateway_factory(max_body_bytes=LIMIT)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "sim", "messages": [{"role": "user", "content": "'
        for _ in range(1000):
            sent += 1000
            yield b"x" * 1000
            await asyncio.sleep(0)
        yield b'"}]}'

    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", data=endless(), headers=JSON) as resp:
            assert resp.status == 413
            assert await resp.json() == TOO_LARGE
        print(f"413 after {sent} bytes sent")
        await assert_still_serving(http, gateway.v1)
    assert len(gateway.sim.log.records) == 1


async def test_a_body_that_is_not_utf8_is_400(gateway_factory):
    gateway = await gateway_factory()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe bad"}]}'
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", data=body, headers=JSON) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": {
                "message": "request body is not valid UTF-8 (at byte 57)",
                "type": "invalid_request_error",
                "code": "invalid_encoding",
            }}
        await assert_still_serving(http, gateway.v1)
    assert len(gateway.sim.log.records) == 1


async def _burst(gateway, prompt: str, headers: list[dict[str, str]]) -> list[str]:
    """One request per header set, all in before the upstream answers any
    (the gateway runs on HELD_SIM); returns each one's text."""
    async with aiohttp.ClientSession() as http:

        async def one(extra: dict[str, str]) -> str:
            chat = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
            async with http.post(gateway.v1 + "/chat/completions", json=chat, headers=extra) as resp:
                assert resp.status == 200
                return openai_text(await FrameReader(resp).rest())

        async with asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                tasks = [clients.create_task(one(h)) for h in headers]
                await subscribed(gateway, len(headers))
        return [task.result() for task in tasks]


async def test_coalesce_scope_global_shares_across_tenants(gateway_factory):
    gateway = await gateway_factory(
        sim_profile=HELD_SIM, gateway_api_keys=("sk-one", "sk-two"), coalesce_scope="global"
    )
    prompt = "shared by all"
    texts = await _burst(gateway, prompt, [
        {"Authorization": "Bearer sk-one"}, {"Authorization": "Bearer sk-two"}, {"x-api-key": "sk-two"},
    ])
    assert texts == [answer(prompt)] * 3
    assert len(gateway.sim.log.records) == 1
    stats = gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (1, 2)


async def test_without_configured_keys_a_sent_key_still_scopes_the_answer(gateway_factory):
    """No GATEWAY_API_KEYS: every request is let in, and whatever key a
    client sends is its tenant: the same key shares, another key or none
    does not (COALESCE_SCOPE=key, the default)."""
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "whose answer"
    texts = await _burst(gateway, prompt, [
        {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer alpha"},
        {"Authorization": "Bearer beta"}, {},
    ])
    assert texts == [answer(prompt)] * 4
    assert len(gateway.sim.log.records) == 3  # alpha (shared), beta, no key
    assert not any(record.authorization for record in gateway.sim.log.records)
    stats = gateway.state.registry.statistics()
    assert (stats.leaders_total, stats.followers_total) == (3, 1)


async def test_last_event_id_after_the_stream_finished_starts_a_fresh_answer(gateway):
    """Finished streams are not kept, so there is nothing to resume: the
    request is served as new, its ids starting again at 1 (not after N), which
    is how a client sees that it restarted (gateway/static/sse-client.js,
    onRestart) and drops what it had, rather than appending a second answer."""
    prompt = "resume too late [sim tokens=10]"
    chat = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=chat) as first:
            frames = await FrameReader(first).rest()
        assert [f.id for f in frames if f.event == "delta"] == [str(i) for i in range(1, 11)]
        async with asyncio.timeout(5):  # the stream and its actor are gone
            await gateway.state.registry.wait_idle()
        async with http.post(gateway.v1 + "/stream", json=chat, headers={"Last-Event-ID": "5"}) as again:
            assert again.status == 200
            resumed = await FrameReader(again).rest()
    assert resumed[0].raw == b": ping\n\n"
    meta = next(f for f in resumed if f.event == "meta").json()
    assert meta["role"] == "leader"
    assert [f.id for f in resumed if f.event == "delta"] == [str(i) for i in range(1, 11)]
    assert native_text(resumed) == native_text(frames) == answer(prompt, 10)
    assert resumed[-1].event == "done" and resumed[-1].json()["finish_reason"] == "stop"
    assert [r.outcome for r in await gateway.sim.log.wait_for(2)] == ["complete", "complete"]
