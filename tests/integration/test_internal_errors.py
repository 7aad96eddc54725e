"""A bug of ours, not the upstream's fault, at the two places it can surface:
after the 200 it ends the stream with the in-stream ``internal_error`` (no
``[DONE]``), before it the envelope answers 500 in the OpenAI shape. Either
way: one log line with the traceback, nothing of the bug's text sent to the
client, every gauge back to zero, and the next request served.

The bug is injected at the transport port (gateway/upstream/base.py) of
the one upstream: the
real transport to the real simulator, whose streams raise a RuntimeError at
their second read, which no upstream failure raises. A real peer reaches
these paths only through a bug of ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest
from aiohttp import web
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.state import STATE
from gateway.upstream.base import ResponseHead, ResponseStream, Transport, UpstreamRequest
from tests.integration.conftest import both_protocols
from tests.integration.sse_frames import FrameReader
from tests.integration.test_gateway_errors import assert_still_serving
from tests.loopback import serving

INTERNAL = {"message": "internal error", "type": "server_error", "code": "internal_error"}
BUG = "a bug in the gateway (secret detail)"
#: Answers far longer than any test: the upstream is still sending when the
#: bug strikes, so giving it up is seen as a reset or disconnect.
LONG = "[sim itl_ms=50 tokens=200]"


@dataclasses.dataclass
class BrokenStream:
    """A real response stream whose ``read`` raises at the ``break_at``-th call."""

    inner: ResponseStream
    break_at: int
    reads: int = 0

    async def head(self) -> ResponseHead:
        return await self.inner.head()

    async def read(self) -> bytes:
        self.reads += 1
        if self.reads == self.break_at:
            self.inner.reset()
            raise RuntimeError(BUG)
        return await self.inner.read()

    def reset(self) -> None:
        self.inner.reset()

    def release(self) -> None:
        self.inner.release()


@dataclasses.dataclass
class BreakingTransport:
    """The gateway's own transport; each stream it opens breaks at a read."""

    inner: Transport
    break_at: int = 2

    async def open(self, request: UpstreamRequest) -> ResponseStream:
        return BrokenStream(await self.inner.open(request), self.break_at)

    def connection_count(self) -> int:
        return self.inner.connection_count()


@contextmanager
def breaking_upstream(state) -> Iterator[None]:
    """While the block runs, the streams the gateway opens break at a read
    (its upstream's transport wrapped in ``BreakingTransport``); then the
    transport is put back, so the gateway serves as before."""
    upstream = state.router.upstreams[0]
    upstream.transport = BreakingTransport(upstream.transport)
    try:
        yield
    finally:
        upstream.transport = upstream.transport.inner


async def wait_idle(state) -> None:
    async with asyncio.timeout(5):
        await state.registry.wait_idle()
    assert state.active_streams == 0 and state.admission.inflight == 0
    assert len(state.keepalive) == 0


def log_lines(logs: list[dict], event: str) -> list[dict]:
    return [line for line in logs if line["event"] == event]


@both_protocols
async def test_a_bug_mid_stream_is_an_in_stream_internal_error(gateway):
    state = gateway.state
    chat = {"model": "sim", "stream": True,
            "messages": [{"role": "user", "content": f"breaks inside {LONG}"}]}
    async with aiohttp.ClientSession() as http:
        with breaking_upstream(state), capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.v1 + "/chat/completions", json=chat) as resp:
                assert resp.status == 200
                frames = await FrameReader(resp).rest()
            async with http.post(gateway.v1 + "/stream", json={**chat, "messages": [
                {"role": "user", "content": f"breaks inside too {LONG}"}]}) as resp:
                assert resp.status == 200
                native = await FrameReader(resp).rest()
        assert frames[0].raw == b": ping\n\n"
        assert frames[-1].json() == {"error": INTERNAL}
        assert all(frame.data != "[DONE]" for frame in frames)
        assert native[-1].event == "error"
        assert native[-1].json() == {"code": "internal_error", "message": "internal error",
                                     "retryable": False}
        assert BUG not in (b"".join(f.raw for f in frames + native)).decode()
        # One traceback per stream, one request line each, with the outcome.
        failed = log_lines(logs, "stream failed")
        assert len(failed) == 2 and all(line["log_level"] == "error" for line in failed)
        requests = log_lines(logs, "request")
        assert [(r["status"], r["outcome"], r["error"]) for r in requests] == [
            (200, "error", "internal_error")] * 2
        await wait_idle(state)
        # The upstream stream was given up, not left running.
        records = await gateway.sim.log.wait_for(2)
        assert sorted(r.outcome for r in records) == [gateway.cancel_outcome] * 2
        await assert_still_serving(http, gateway.v1)


@both_protocols
async def test_a_bug_before_the_answer_is_a_500_from_the_envelope(gateway):
    """A non-streaming request collects the whole answer before its head:
    the same bug reaches the envelope middleware, which answers 500."""
    state = gateway.state
    chat = {"model": "sim", "stream": False,
            "messages": [{"role": "user", "content": f"breaks whole {LONG}"}]}
    async with aiohttp.ClientSession() as http:
        with breaking_upstream(state), capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.v1 + "/chat/completions", json=chat) as resp:
                assert resp.status == 500
                assert resp.headers["X-Request-Id"]
                assert resp.content_type == "application/json"
                assert await resp.json() == {"error": INTERNAL}
        unhandled = log_lines(logs, "unhandled error")
        assert len(unhandled) == 1 and unhandled[0]["request_id"] == resp.headers["X-Request-Id"]
        requests = log_lines(logs, "request")
        assert [(r["status"], r["outcome"], r["error"]) for r in requests] == [
            (500, "error", "internal_error")]
        await wait_idle(state)
        await assert_still_serving(http, gateway.v1)


@pytest.fixture
async def nested_json_upstream():
    """An HTTP/1.1 upstream whose second chunk is a 100,000-deep JSON array."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}]}\n\n'
        )
        await response.write(b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serving(app) as url:
        yield url + "/v1"


async def test_an_upstream_chunk_nested_too_deep_is_a_protocol_error(nested_json_upstream):
    """JSON nested past the interpreter's recursion limit is the upstream's
    malformed chunk, not a bug of ours."""
    settings = Settings(host="127.0.0.1", port=0, upstream_url=nested_json_upstream,
                        upstream_protocol="http1")
    chat = {"model": "m", "messages": [{"role": "user", "content": "deep"}], "stream": True}
    async with running_gateway(settings) as (app, url), aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=chat) as resp:
            frames = await FrameReader(resp).rest()
        await wait_idle(app[STATE])
    assert frames[-1].json()["error"]["code"] == "upstream_protocol_error"
