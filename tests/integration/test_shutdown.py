"""Graceful shutdown of ``python -m gateway`` (gateway/__main__.py), as a process.

SIGTERM (or SIGINT, or SIGHUP): the listener closes and idle keep-alive connections are
closed at once, streams in flight finish for up to DRAIN_TIMEOUT_S, the rest
then end with an in-stream ``shutting_down`` error and their upstream streams
are reset; exit status 0. The drain runs over both upstream protocols.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.sim.content import answer_tokens
from tests.integration.conftest import both_protocols
from tests.integration.sse_frames import Frame, FrameReader, native_text, openai_text

LISTENING = re.compile(
    rb"llm-stream-gateway listening on http://127\.0\.0\.1:(\d+) \(upstream: \S+\)\n"
)
START_TIMEOUT_S = 15.0
#: Slow enough that the signal surely comes mid-stream: 20 tokens, 1 s.
SLOW = "[sim itl_ms=50 tokens=20]"
#: Far longer than any test: 200 tokens, 20 s.
VERY_SLOW = "[sim itl_ms=100 tokens=200]"


def chat(prompt: str) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}


def answer(prompt: str, tokens: int) -> str:
    return "".join(answer_tokens([{"role": "user", "content": prompt}], tokens))


@dataclass
class GatewayProcess:
    """``python -m gateway`` as our child. Its stderr (JSON log lines) is read
    by one owned task, so the pipe never fills and tests can wait for an event."""

    process: asyncio.subprocess.Process
    port: int
    log: list[dict[str, object]] = field(default_factory=list)
    _logged: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            try:
                self.log.append(json.loads(line))
            except ValueError:  # not a log line (a traceback?): keep it for the failure report
                self.log.append({"event": None, "raw": line.decode(errors="replace")})
            self._logged.set()

    async def wait_logged(self, event: str) -> dict[str, object]:
        async with asyncio.timeout(5):
            while True:
                for line in self.log:
                    if line["event"] == event:
                        return line
                self._logged.clear()
                await self._logged.wait()

    def events(self) -> list[object]:
        return [line["event"] for line in self.log]


@asynccontextmanager
async def gateway_process(
    upstream_url: str, protocol: str = "h2c", **env: str
) -> AsyncIterator[GatewayProcess]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "UPSTREAM_URL": upstream_url,
            "UPSTREAM_PROTOCOL": protocol,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": "0",
            "LOG_FORMAT": "json",
            **env,
        },
    )
    assert process.stdout is not None
    reader: asyncio.Task[None] | None = None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)
        match = LISTENING.fullmatch(line)
        assert match, line
        gateway = GatewayProcess(process, int(match.group(1)))
        reader = asyncio.create_task(gateway.read_log(), name="gateway-stderr")
        yield gateway
    finally:
        if process.returncode is None:  # a failed test: do not leave it behind
            process.kill()
        await asyncio.wait_for(process.wait(), 10)
        if reader is not None:
            await reader


async def open_stream(http: aiohttp.ClientSession, url: str, prompt: str) -> FrameReader:
    """A stream that has produced its first token (so it is surely in flight)."""
    response = await http.post(url, json=chat(prompt))
    assert response.status == 200
    reader = FrameReader(response)
    while not any(_is_content(frame) for frame in reader.frames):
        assert await reader.next() is not None
    return reader


def _is_content(frame: Frame) -> bool:
    if frame.event == "delta":
        return True
    return bool(frame.data and frame.data != "[DONE]" and frame.json().get("choices"))


async def idle_keepalive_connection(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has had one answer and now sits idle, kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    assert json.loads(await reader.readexactly(length)) == {"status": "ok"}
    return reader, writer


@both_protocols
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
async def test_streams_in_flight_finish_and_nothing_new_gets_in(sim_factory, signum, upstream_protocol):
    sim = await sim_factory()
    prompts = [f"drain me {n} {SLOW}" for n in range(3)]
    async with gateway_process(sim.url, upstream_protocol, DRAIN_TIMEOUT_S="20") as gateway, \
            aiohttp.ClientSession() as http:
        idle_reader, idle_writer = await idle_keepalive_connection(gateway.port)
        streams = [
            await open_stream(http, gateway.url + "/v1/stream", prompts[0]),
            await open_stream(http, gateway.url + "/v1/stream", prompts[1]),
            await open_stream(http, gateway.url + "/v1/chat/completions", prompts[2]),
        ]
        gateway.process.send_signal(signum)

        # The idle keep-alive connection is closed at once (EOF, no answer)...
        async with asyncio.timeout(5):
            assert await idle_reader.read() == b""
        idle_writer.close()
        await idle_writer.wait_closed()
        # ... and the listener was closed in the same tick: refused.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", gateway.port)

        # Meanwhile every stream in flight runs to its complete end.
        async with asyncio.timeout(10):
            for stream in streams:
                await stream.rest()
                stream.response.release()
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0

    native_a, native_b, openai_stream = (stream.frames for stream in streams)
    for frames, prompt in ((native_a, prompts[0]), (native_b, prompts[1])):
        assert native_text(frames) == answer(prompt, 20)
        assert frames[-1].event == "done" and frames[-1].json()["finish_reason"] == "stop"
    assert openai_text(openai_stream) == answer(prompts[2], 20)
    assert openai_stream[-1].raw == b"data: [DONE]\n\n"
    assert [record.outcome for record in sim.log.records] == ["complete"] * 3
    draining = await gateway.wait_logged("draining")
    assert draining["streams"] == 3 and draining["signal"] == signum.name
    events = gateway.events()
    assert "drained" in events and "ending the remaining streams" not in events
    assert events[-1] == "stopped"


@both_protocols
@pytest.mark.parametrize("cut_by", ["drain timeout", "second signal"])
async def test_streams_still_running_at_the_end_get_an_in_stream_error(
    sim_factory, cut_by, upstream_protocol
):
    sim = await sim_factory()
    drain_timeout_s = 0.3 if cut_by == "drain timeout" else 30.0
    native_prompt, openai_prompt = f"cut native {VERY_SLOW}", f"cut openai {VERY_SLOW}"
    # How the simulator logs a stream the gateway gave up on.
    cancelled = "disconnect" if upstream_protocol == "http1" else "reset"
    async with gateway_process(
        sim.url, upstream_protocol, DRAIN_TIMEOUT_S=str(drain_timeout_s)
    ) as gateway, \
            aiohttp.ClientSession() as http:
        native = await open_stream(http, gateway.url + "/v1/stream", native_prompt)
        openai = await open_stream(http, gateway.url + "/v1/chat/completions", openai_prompt)
        signalled_at = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        if cut_by == "second signal":
            await gateway.wait_logged("draining")
            gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await native.rest()
            await openai.rest()
        ended_after_s = time.monotonic() - signalled_at
        native.response.release()
        openai.response.release()
        # The upstream saw both streams reset: nobody pays for the rest.
        resets = await sim.log.wait_for(2, outcome=cancelled)
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0

    print(f"streams ended {ended_after_s * 1000:.0f} ms after SIGTERM ({cut_by})")
    if cut_by == "drain timeout":
        assert drain_timeout_s <= ended_after_s < drain_timeout_s + 3
    else:
        assert ended_after_s < 5  # not the 30 s drain timeout
    assert [record.outcome for record in sim.log.records] == [cancelled, cancelled]
    assert all(0 < record.tokens_sent < 200 for record in resets)

    error = native.frames[-1]
    assert error.event == "error"
    assert error.json()["code"] == "shutting_down" and error.json()["retryable"] is True
    assert answer(native_prompt, 200).startswith(native_text(native.frames))
    assert native_text(native.frames)  # it did stream before it was cut
    assert openai.frames[-1].json()["error"]["code"] == "shutting_down"
    assert all(frame.data != "[DONE]" for frame in openai.frames)
    assert answer(openai_prompt, 200).startswith(openai_text(openai.frames[:-1]))
    ending = await gateway.wait_logged("ending the remaining streams")
    assert ending["reason"] == cut_by and ending["actors"] == 2


async def test_a_request_read_while_draining_is_refused_and_not_ready(gateway):
    """The answers of step 1 (gateway/__main__.py) for requests already read
    when the signal came. Over a socket no later request can get this far
    (listener and idle connections are closed in the same tick), so the
    draining flag is set directly here."""
    gateway.state.draining = True
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/readyz") as ready:
            assert ready.status == 503
            assert await ready.json() == {"status": "draining"}
        async with http.post(gateway.v1 + "/chat/completions", json=chat("late")) as late:
            assert late.status == 503
            assert (await late.json())["error"]["code"] == "shutting_down"
        async with http.get(gateway.url + "/healthz") as alive:
            assert alive.status == 200  # alive, just not taking work
    assert gateway.sim.log.records == []


async def test_a_request_whose_body_was_on_its_way_at_the_signal_is_refused(sim_factory):
    """SIGTERM while a request's body is still arriving, no stream in flight:
    the drain waits for that request too; once its body is in it is answered
    503 ``shutting_down`` with ``Connection: close``, no upstream call starts,
    and the process ends right after."""
    sim = await sim_factory()
    body = json.dumps(chat("on its way")).encode()
    async with gateway_process(sim.url) as gateway, aiohttp.ClientSession() as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body[:10]))
            await writer.drain()
            # A request sent after it and answered: the gateway has run the
            # first one's handler up to its wait for the rest of the body.
            async with http.get(gateway.url + "/healthz") as alive:
                assert alive.status == 200
            gateway.process.send_signal(signal.SIGTERM)
            await gateway.wait_logged("draining")
            writer.write(body[10:])
            await writer.drain()
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
                assert length is not None, head
                answer_body = await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()
        # Well within the drain timeout (30 s) and the body's own (60 s).
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert re.search(rb"(?i)\r\nconnection: close\r\n", head), head
    assert json.loads(answer_body)["error"]["code"] == "shutting_down"
    assert sim.log.records == []


#: An answer far larger than what a client's socket buffers and the
#: gateway's transport hold: 2,000 tokens of 500 bytes, 1 MB.
HUGE = "[sim itl_ms=0 tokens=2000 token_size=500]"


@asynccontextmanager
async def a_client_that_stops_reading(gateway: GatewayProcess, sim, prompt: str) -> AsyncIterator[None]:
    """A client with a small receive window that asks for ``prompt`` (a HUGE
    answer) and reads none of it: open until the block ends, the whole
    answer in the gateway's hands by its start."""
    loop = asyncio.get_running_loop()
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        stuck.setblocking(False)
        await loop.sock_connect(stuck, ("127.0.0.1", gateway.port))
        body = json.dumps(chat(prompt)).encode()
        await loop.sock_sendall(stuck, b"POST /v1/stream HTTP/1.1\r\nHost: gw\r\n"
                                b"Content-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await sim.log.wait_for(1, outcome="complete", timeout=10)
        yield
    finally:
        stuck.close()


async def test_a_client_that_stops_reading_does_not_hold_the_exit_past_the_drain(sim_factory):
    """A client that stops reading mid-stream (gone without a FIN, or
    stuck): its handler waits on a write no drain can finish. At the end of
    the drain it is cut like the other streams, and the process exits 0
    within a few seconds of DRAIN_TIMEOUT_S, not after aiohttp's own 60 s."""
    sim = await sim_factory()
    drain_timeout_s = 0.5
    async with (
        gateway_process(sim.url, DRAIN_TIMEOUT_S=str(drain_timeout_s)) as gateway,
        a_client_that_stops_reading(gateway, sim, f"never read {HUGE}"),
    ):
        signalled_at = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gateway.process.wait() == 0
        exited_after_s = time.monotonic() - signalled_at
    assert exited_after_s < drain_timeout_s + 5, exited_after_s
    ending = await gateway.wait_logged("ending the remaining streams")
    assert ending["reason"] == "drain timeout" and ending["requests"] == 1
    assert gateway.events()[-1] == "stopped"


@pytest.mark.parametrize("again", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_after_the_drain_ended_still_exits_0(sim_factory, again):
    """A further stop signal while the process closes what the drain left
    (here: the last frame of a client that stopped reading, up to
    LAST_FRAME_TIMEOUT_S) is one more request to stop: the process still
    exits 0 and writes ``stopped``, not killed by the signal's default."""
    sim = await sim_factory()
    async with (
        gateway_process(sim.url, DRAIN_TIMEOUT_S="0") as gateway,
        a_client_that_stops_reading(gateway, sim, f"never read after {HUGE}"),
    ):
        gateway.process.send_signal(signal.SIGTERM)
        # The drain is over; the stuck handler holds the cleanup for 1 s.
        await gateway.wait_logged("ending the remaining streams")
        gateway.process.send_signal(again)
        async with asyncio.timeout(15):
            assert await gateway.process.wait() == 0
    assert gateway.events()[-1] == "stopped"
