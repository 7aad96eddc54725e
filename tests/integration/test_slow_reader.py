"""One client reading very slowly while 200 others stream the same long
answer: the slow one is ended with an in-stream ``slow_reader`` error once it
lags past the bound, the stream's retained log stays bounded, and the others
get their exact answers at an inter-token latency the slow one does not
change."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time

import aiohttp
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.sim.content import answer_tokens
from gateway.sim.profile import SimProfile
from tests.integration.conftest import until
from tests.integration.sse_frames import FrameReader, openai_text
from tests.loopback import event_stream_upstream, serving

TOKENS, TOKEN_SIZE, ITL_MS = 1000, 500, 3
LAG_BYTES = 128 * 1024
OTHERS = 200
PROMPT = f"a long shared answer [sim ttft_ms=1500 itl_ms={ITL_MS} tokens={TOKENS} token_size={TOKEN_SIZE}]"
BODY = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}


async def _others(url: str, count: int) -> list[tuple[str, list[float]]]:
    """``count`` clients of the same prompt: each one's text and the gaps
    between its content frames."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> tuple[str, list[float]]:
            async with http.post(url, json=BODY) as resp:
                frames = await FrameReader(resp).rest()
            times = [f.at for f in frames if f.data and f.data != "[DONE]" and '"content"' in f.data]
            return openai_text(frames), [b - a for a, b in zip(times, times[1:], strict=False)]

        return await asyncio.gather(*(one() for _ in range(count)))


def _slow_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", port))
    body = json.dumps(BODY).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock.setblocking(False)
    return sock


async def test_a_slow_reader_is_ended_and_the_others_never_wait(gateway_factory):
    gateway = await gateway_factory(
        sim_profile=SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=1, itl_jitter_ms=0),
        max_replay_bytes=1024,  # joiners close at once: from there the log is trimmed
        stream_max_lag_bytes=LAG_BYTES,
        max_inflight=512,
    )
    url = gateway.v1 + "/chat/completions"
    expected = "".join(answer_tokens(BODY["messages"], TOKENS, TOKEN_SIZE))

    loop = asyncio.get_running_loop()
    port = int(gateway.url.rsplit(":", 1)[1])
    slow = _slow_socket(port)
    received = bytearray()
    peak_log = 0

    async def read_slowly(stop: asyncio.Event) -> None:
        while not stop.is_set():  # one byte a second, until the others are done
            received.extend(await loop.sock_recv(slow, 1))
            try:
                async with asyncio.timeout(1.0):
                    await stop.wait()
            except TimeoutError:
                pass

    async def watch_log(stop: asyncio.Event) -> None:
        nonlocal peak_log
        while not stop.is_set():
            peak_log = max(peak_log, gateway.state.registry.statistics().replay_bytes)
            await asyncio.sleep(0.01)

    stop = asyncio.Event()
    helpers = [asyncio.create_task(read_slowly(stop)), asyncio.create_task(watch_log(stop))]
    try:
        started = time.monotonic()
        others = await _others(url, OTHERS)
        took = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(*helpers)

    # The others: exact answers, at the upstream's pace (generous: a loaded
    # machine delivers 200 streams in bursts).
    assert all(text == expected for text, _ in others)
    gap = statistics.median(g for _, gaps in others for g in gaps)
    mean_gap = statistics.mean(sum(gaps) / len(gaps) for _, gaps in others)
    assert gap <= 4 * ITL_MS / 1000 + 0.01, gap
    assert mean_gap <= 3 * ITL_MS / 1000 + 0.005, mean_gap
    assert took < 30
    # One upstream stream (every client joined in its first token's wait)...
    assert len(gateway.sim.log.records) == 1
    # ... and its log never held much more than the bound (1.5 times, checked as it grows).
    assert peak_log <= 1.5 * LAG_BYTES + 2 * (64 + TOKEN_SIZE), peak_log

    # The slow one, read out at full speed now: its stream ends with the error.
    async with asyncio.timeout(20):
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = await loop.sock_recv(slow, 65536)
            assert chunk, "closed before the end of the body"
            received.extend(chunk)
    slow.close()
    assert b"data: [DONE]" not in received
    last = received.rsplit(b"data: ", 1)[1].split(b"\n\n", 1)[0]
    error = json.loads(last)["error"]
    assert error["code"] == "slow_reader"
    async with asyncio.timeout(5):
        await gateway.state.registry.wait_idle()
    assert gateway.state.active_streams == 0


def _chunk(text: str) -> bytes:
    return b"data: %s\n\n" % json.dumps({
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }).encode()


#: 2,000 deltas in one write: the gateway reads many at once, far more than
#: the lag bound below, before any of its readers has had a turn.
BURST_WORDS = [f"w{n:04} " for n in range(2000)]
BURST = b"".join(_chunk(word) for word in BURST_WORDS) + b"data: [DONE]\n\n"


async def test_a_reader_waiting_for_the_next_delta_is_never_too_slow():
    """The lag bound ends a reader its client holds back, never one that read
    all there was and waits for more, as a non-streaming answer's does: a
    burst the gateway reads at once, far past the bound, is answered whole
    (it was a 500 ``internal_error``: the gatherer was ended as slow)."""
    upstream = event_stream_upstream("/v1/chat/completions", lambda body: BURST)
    async with serving(upstream) as url, running_gateway(Settings(
        host="127.0.0.1", port=0, upstream_url=url + "/v1", upstream_protocol="http1",
        stream_max_lag_bytes=1024, max_replay_bytes=1024,
    )) as (_, gateway_url), aiohttp.ClientSession() as http:
        messages = [{"role": "user", "content": "burst"}]
        async with http.post(gateway_url + "/v1/chat/completions",
                             json={"model": "m", "messages": messages}) as whole:
            assert whole.status == 200
            completion = await whole.json()
        async with http.post(gateway_url + "/v1/messages",
                             json={"model": "m", "max_tokens": 9000, "messages": messages}) as whole:
            assert whole.status == 200
            message = await whole.json()
    assert completion["choices"][0]["message"]["content"] == "".join(BURST_WORDS)
    assert message["content"] == [{"type": "text", "text": "".join(BURST_WORDS)}]


async def test_a_client_that_takes_nothing_is_ended_after_the_lag_time(gateway_factory):
    """A client that stops reading for good blocks its stream's writes: past
    STREAM_MAX_LAG_S of taking nothing it is ended (its connection closed,
    it reads nothing more anyway), also once the stream's answer is all in,
    when no delta arrives any more to check its lag by -- not held until the
    kernel gives up on it (TCP_USER_TIMEOUT, 120 s)."""
    gateway = await gateway_factory(
        sim_profile=SimProfile(ttft_ms=5, ttft_jitter_ms=0, itl_ms=0, itl_jitter_ms=0),
        stream_max_lag_s=0.5,
        ping_interval_s=0.2,
    )
    body = json.dumps({"model": "sim", "messages": [
        {"role": "user", "content": "never read [sim tokens=1800 token_size=500]"}
    ]}).encode()
    port = int(gateway.url.rsplit(":", 1)[1])
    with capture_logs(processors=[merge_contextvars]) as logs, socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"POST /v1/stream HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        # The whole answer is in the gateway: only the client holds its stream.
        await gateway.sim.log.wait_for(1, outcome="complete")
        assert gateway.state.active_streams == 1
        await until(lambda: gateway.state.active_streams == 0)
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert (line["outcome"], line["error"]) == ("cancelled", "slow_reader")
    assert gateway.state.registry.statistics().subscribers == 0
