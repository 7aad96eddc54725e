"""Client connections over raw sockets: idle, slowloris and stalled-body
clients are closed by their deadlines; a half-closing client is answered;
aiohttp's parser errors speak the OpenAI error shape."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.sim.content import answer_tokens
from tests.integration.sse_frames import parse_frame

HOST = "127.0.0.1"
#: As many as the fault run held open (its figures: 2,000 idle, 500 slowloris,
#: 200 stalled bodies), within a test process's descriptor limit.
IDLE, SLOWLORIS, STALLED = 1000, 500, 200


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def chat_bytes(prompt: str, *, stream: bool) -> bytes:
    return json.dumps({"model": "sim", "stream": stream,
                       "messages": [{"role": "user", "content": prompt}]}).encode()


def post(body: bytes, *, path: str = "/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


async def read_to_eof(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> bytes:
    async with asyncio.timeout(timeout_s):
        return await reader.read()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


# -- deadlines ---------------------------------------------------------------------------


async def test_idle_keepalive_connections_are_closed_after_the_idle_timeout(gateway_factory):
    gateway = await gateway_factory(client_idle_timeout_s=0.5)
    port = _port(gateway.url)
    # Some never send a byte, some had one answer and sit kept alive.
    silent = [await asyncio.open_connection(HOST, port) for _ in range(IDLE)]
    kept = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await reader.readuntil(b'"ok"}')
        kept.append((reader, writer))
    started = time.monotonic()
    for reader, writer in silent + kept:
        assert await read_to_eof(reader) == b""  # closed, nothing sent
        writer.close()
    assert time.monotonic() - started >= 0.3  # not before the deadline
    await _still_serving(port)


async def test_slowloris_clients_are_closed_by_the_header_deadline(gateway_factory):
    gateway = await gateway_factory(client_header_timeout_s=0.5, client_idle_timeout_s=30)
    port = _port(gateway.url)
    request = post(chat_bytes("never complete", stream=False))

    async def slowloris() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(HOST, port)
        started = time.monotonic()
        try:
            for byte in request:  # one byte per 100 ms: the head takes ~13 s
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    async with asyncio.timeout(0.1):
                        data = await reader.read()
                    return data, time.monotonic() - started  # EOF: closed
                except TimeoutError:
                    pass
            return b"completed?!", time.monotonic() - started
        except ConnectionError:
            return b"", time.monotonic() - started
        finally:
            writer.close()

    results = await asyncio.gather(*(slowloris() for _ in range(SLOWLORIS)))
    for data, elapsed in results:
        assert data == b""  # closed without an answer
        assert 0.4 <= elapsed < 3.0
    assert gateway.sim.log.records == []
    await _still_serving(port)


async def test_a_stalled_body_gets_408_and_its_connection_closed(gateway_factory):
    gateway = await gateway_factory(client_body_timeout_s=0.5)
    port = _port(gateway.url)

    async def stalled() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(HOST, port)
        body = chat_bytes("stalled", stream=False)
        # Content-Length promises more than is sent.
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body) + 100)
                     + body)
        started = time.monotonic()
        try:
            return await read_to_eof(reader), time.monotonic() - started
        finally:
            writer.close()

    results = await asyncio.gather(*(stalled() for _ in range(STALLED)))
    for raw, elapsed in results:
        status, headers, body = split_response(raw)
        assert status == 408
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert 0.4 <= elapsed < 5.0
    assert gateway.sim.log.records == []
    await _still_serving(port)


# -- half-close --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_a_half_closing_client_is_answered(gateway, stream):
    prompt = f"half close {stream} [sim itl_ms=5 tokens=20]"
    sock = socket.create_connection((HOST, _port(gateway.url)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(post(chat_bytes(prompt, stream=stream)))
    await writer.drain()
    sock.shutdown(socket.SHUT_WR)  # the whole request sent: our side is done
    raw = await read_to_eof(reader)
    writer.close()
    if not stream:
        # Probed with interim responses (a stream, with its pings), which a
        # client parses and skips (RFC 9110 §15.2).
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        assert raw.startswith(interim)
        raw = raw.removeprefix(interim * raw.count(interim))
    status, headers, body = split_response(raw)
    assert status == 200
    if not stream:  # a stream's head left before the EOF came
        assert headers["connection"] == "close"
    expected = "".join(answer_tokens([{"role": "user", "content": prompt}], 20))
    if stream:
        frames = [parse_frame(frame, 0.0) for frame in body.split(b"\n\n") if frame]
        text = "".join(
            choice["delta"].get("content", "")
            for frame in frames if frame.data and frame.data != "[DONE]"
            for choice in frame.json()["choices"]
        )
        assert text == expected
        assert body.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(body)["choices"][0]["message"]["content"] == expected
    (record,) = gateway.sim.log.records
    assert record.outcome == "complete"


async def test_a_half_closed_client_gets_at_most_five_interim_responses(gateway):
    # The probe's six steps span a second; Go's HTTP clients refuse a sixth
    # interim response before the final one.
    prompt = "half close, slowly [sim ttft_ms=1500 tokens=2]"
    sock = socket.create_connection((HOST, _port(gateway.url)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(post(chat_bytes(prompt, stream=False)))
    await writer.drain()
    sock.shutdown(socket.SHUT_WR)
    raw = await read_to_eof(reader)
    writer.close()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert raw.startswith(interim * 5) and raw.count(interim) == 5
    status, _, body = split_response(raw.removeprefix(interim * 5))
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "".join(
        answer_tokens([{"role": "user", "content": prompt}], 2))


async def test_a_client_that_closes_mid_stream_is_still_a_cancel(gateway):
    """Its FIN looks like a half-close; the probe finds it gone."""
    prompt = "closes [sim ttft_ms=5000]"
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    writer.write(post(chat_bytes(prompt, stream=True)))
    await reader.readuntil(b": ping\n\n")
    await gateway.sim.log.wait_for_arrivals(1)
    closed_at = time.monotonic()
    writer.close()
    (record,) = await gateway.sim.log.wait_for(1, outcome="reset")
    assert record.end - closed_at < 0.3


async def test_a_client_that_closes_before_a_whole_answer_is_a_cancel(gateway):
    """Non-streaming (an SDK's timeout, say): nothing of the answer has been
    written, and the probe's interim responses find the client gone."""
    prompt = "closes early [sim ttft_ms=5000]"
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    writer.write(post(chat_bytes(prompt, stream=False)))
    await writer.drain()
    await gateway.sim.log.wait_for_arrivals(1)
    closed_at = time.monotonic()
    writer.close()
    (record,) = await gateway.sim.log.wait_for(1, outcome="reset")
    assert record.end - closed_at < 0.3


@pytest.mark.parametrize("how", ["half-close", "close"])
async def test_a_client_that_leaves_with_half_a_body_is_a_cancel(gateway, how):
    """Not our error: one request line each, cancelled, status 499 (nginx's
    "client closed request"), no traceback, nothing sent upstream."""
    body = chat_bytes("half a body", stream=True)
    with capture_logs(processors=[merge_contextvars]) as logs:
        for _ in range(10):
            reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
            writer.write(post(body)[:-10])
            await writer.drain()
            if how == "half-close":
                writer.write_eof()
                assert await read_to_eof(reader) == b""
            writer.close()
        async with asyncio.timeout(10):
            while sum(line["event"] == "request" for line in logs) < 10:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    requests = [line for line in logs if line["event"] == "request"]
    assert [(line["status"], line["outcome"]) for line in requests] == [(499, "cancelled")] * 10
    assert [line["event"] for line in logs if line["log_level"] in ("error", "warning")] == []
    assert gateway.sim.log.records == []


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_an_http10_stream_ends_with_its_connection(gateway, keep_alive):
    """HTTP/1.0 has no chunked coding, so a stream's end is its connection's
    end (RFC 9112 §6.3): closed right after the last frame, never announced
    as kept alive, even when the client asks for it."""
    body = chat_bytes("one point oh", stream=True)
    head = (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body))
    if keep_alive:
        head += b"Connection: keep-alive\r\n"
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    try:
        writer.write(head + b"\r\n" + body)
        raw = await read_to_eof(reader)
    finally:
        writer.close()
    response_head, _, stream = raw.partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.0 200 ")
    assert b"keep-alive" not in response_head.lower()
    assert b"transfer-encoding" not in response_head.lower()
    assert stream.endswith(b"data: [DONE]\n\n")


async def test_a_body_that_is_not_its_content_coding_is_a_400_that_closes(gateway, caplog):
    """Declared gzip, sent plain: one 400 in the error shape, the connection
    closed (where a next request would start is unknown), and no traceback
    from aiohttp reading on past it."""
    body = chat_bytes("not gzip", stream=False)
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    try:
        with capture_logs(processors=[merge_contextvars]) as logs:
            writer.write(post(body, extra=b"Content-Encoding: gzip\r\n"))
            raw = await read_to_eof(reader)
    finally:
        writer.close()
    status, headers, answer = split_response(raw)
    assert (status, headers["connection"]) == (400, "close")
    assert json.loads(answer)["error"]["code"] == "invalid_http"
    assert [line["event"] for line in logs] == ["request"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert gateway.sim.log.records == []


# -- aiohttp's own 400s ------------------------------------------------------------------


PARSER_ERRORS = [
    ("1 MB header", b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"),
    ("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Nul: a\x00b\r\n\r\n"),
    ("bad chunk size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("bad Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
     b"Content-Length: abc\r\n\r\n"),
    ("header without a colon", b"GET /healthz HTTP/1.1\r\nHost g\r\n\r\n"),
    ("space in a header name", b"GET /healthz HTTP/1.1\r\nHost: g\r\nBad Name: x\r\n\r\n"),
    ("20 KB request line", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: g\r\n\r\n"),
    ("Content-Length and chunked", b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
     b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n"),
]


@pytest.mark.parametrize("case,raw", PARSER_ERRORS, ids=[c[0] for c in PARSER_ERRORS])
async def test_parser_errors_answer_in_the_json_error_shape(gateway, case, raw):
    with capture_logs(processors=[merge_contextvars]) as logs:
        headers = await _refused_by_the_parser(gateway, raw)
    # One line, under the id the client was given.
    (line,) = logs
    assert line["event"] == "request refused by the HTTP parser"
    assert line["request_id"] == headers["x-request-id"]
    await _still_serving(_port(gateway.url))


async def _refused_by_the_parser(gateway, raw: bytes) -> dict[str, str]:
    """Send ``raw``, check the answer is a 400 in the error shape; its headers."""
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    received = bytearray()

    async def read() -> None:
        # Read while sending: the answer comes (and the connection closes)
        # long before a 1 MB header is all sent, and a reset would drop
        # whatever was left unread.
        try:
            while data := await reader.read(65536):
                received.extend(data)
        except ConnectionError:
            pass

    reading = asyncio.create_task(read())
    try:
        for start in range(0, len(raw), 65536):
            writer.write(raw[start:start + 65536])
            await writer.drain()
    except ConnectionError:
        pass
    async with asyncio.timeout(10):
        await reading
    writer.close()
    status, headers, body = split_response(bytes(received))
    assert status == 400, bytes(received[:200])
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert "aiohttp" not in error["message"]
    assert re.fullmatch(r"[0-9a-f]{24}", headers["x-request-id"])
    return headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/no/such/path"])
async def test_an_expectation_other_than_100_continue_is_a_417_in_the_error_shape(gateway, path):
    """RFC 9110 section 10.1.1: a server may refuse an expectation it cannot
    meet with a 417; it does so as it refuses everything else."""
    reader, writer = await asyncio.open_connection(HOST, _port(gateway.url))
    try:
        with capture_logs(processors=[merge_contextvars]) as logs:
            writer.write(post(b"{}", path=path, extra=b"Expect: tea-please\r\nConnection: close\r\n"))
            raw = await read_to_eof(reader)
    finally:
        writer.close()
    status, headers, body = split_response(raw)
    assert (status, headers["content-type"]) == (417, "application/json; charset=utf-8")
    assert json.loads(body) == {"error": {
        "message": "the gateway meets no expectation but 100-continue",
        "type": "invalid_request_error", "code": "expectation_failed",
    }}
    (line,) = logs
    assert (line["status"], line["error"]) == (417, "expectation_failed")
    assert line["request_id"] == headers["x-request-id"]
    assert gateway.sim.log.records == []
    await _still_serving(_port(gateway.url))


async def _still_serving(port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    status, _, body = split_response(await read_to_eof(reader))
    writer.close()
    assert (status, json.loads(body)) == (200, {"status": "ok"})
