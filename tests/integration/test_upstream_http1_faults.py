"""The gateway in front of an HTTP/1.1 upstream that misbehaves on purpose:
a raw loopback peer writing exact bytes (no HTTP library in the way), over
real sockets, with the gateway's own transport, source and providers."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest

from gateway.app import running_gateway
from gateway.config import Settings
from gateway.routing.router import Upstream
from gateway.state import STATE
from tests.integration.peer_server import serving
from tests.integration.sse_frames import FrameReader

UPSTREAM_KEY = "sk-upstream-NOT-FOR-ELSEWHERE-0123456789"

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)\r\n")

CHUNK = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}\n\n')


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


def chat(prompt: str, *, stream: bool) -> dict[str, object]:
    return {"model": "m", "stream": stream, "max_tokens": 16,
            "messages": [{"role": "user", "content": prompt}]}


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request off the connection, head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = _LENGTH.search(head)
    return head + (await reader.readexactly(int(match.group(1))) if match else b"")


@asynccontextmanager
async def gateway_on(port: int, **settings: Any) -> AsyncIterator[tuple[Upstream, str]]:
    """The gateway with the peer on ``port`` as its one upstream over
    HTTP/1.1; yields that upstream and the gateway's /v1 URL."""
    async with running_gateway(
        Settings(host="127.0.0.1", port=0, upstream_url=f"http://127.0.0.1:{port}/v1",
                 upstream_protocol="http1", upstream_api_key=UPSTREAM_KEY, error_ttl_ms=0,
                 **settings)
    ) as (app, url):
        (upstream,) = app[STATE].router.upstreams
        yield upstream, url + "/v1"


@pytest.mark.parametrize("upstream_format", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [b"307 Temporary Redirect", b"308 Permanent Redirect"])
async def test_a_redirect_is_the_upstreams_answer_and_is_not_followed(upstream_format, status):
    """A 307 or 308 would have the request sent again, body and all, to the
    Location (RFC 9110 §15.4.8, §15.4.9): the client's prompt, and with an
    Anthropic upstream our key in x-api-key (only Authorization is dropped
    across origins). The gateway sends its request to the configured
    upstream alone: the redirect is that upstream's error status."""
    elsewhere: list[bytes] = []
    asked: list[bytes] = []

    async def other_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        elsewhere.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                     + CHUNK + b"data: [DONE]\n\n")
        writer.close()

    async with serving(other_origin) as other_port:
        location = b"http://127.0.0.1:%d/v1/collect" % other_port

        async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            asked.append(await read_request(reader))
            writer.write(b"HTTP/1.1 %s\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (status, location))
            await reader.read()
            writer.close()

        async with serving(redirecting) as port, gateway_on(
            port, upstream_format=upstream_format
        ) as (upstream, v1), aiohttp.ClientSession() as http:
            async with http.post(v1 + "/chat/completions", json=chat("secret plans", stream=False)) as resp:
                answer = await resp.json()
            assert upstream.transport.connection_count() == 0

    assert elsewhere == []
    assert len(asked) == 1 and UPSTREAM_KEY.encode() in asked[0]
    code = status.split()[0].decode()
    assert resp.status == 502 and answer["error"]["code"] == f"upstream_{code}"


async def test_a_compressed_event_stream_fails_at_its_head():
    """The gateway asks for ``Accept-Encoding: identity`` and decodes no
    content coding. An upstream that gzips the stream anyway (a proxy's
    ``gzip_types text/event-stream``) sends bytes no SSE decoder can read:
    the answer fails as unreadable as soon as its head says so, instead of
    holding the client until the first-token deadline (3 s here) and then
    blaming the upstream's speed. Not retried, the connection closed."""
    closed = asyncio.Event()
    asked: list[bytes] = []

    async def gzipping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await read_request(reader))
        gzip = zlib.compressobj(wbits=31)
        first = gzip.compress(CHUNK) + gzip.flush(zlib.Z_SYNC_FLUSH)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(first))
        await reader.read()  # the stream goes on until the gateway closes it
        closed.set()
        writer.close()

    async with serving(gzipping) as port, gateway_on(
        port, upstream_first_token_timeout_ms=3000
    ) as (upstream, v1), aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("zipped", stream=True)) as resp:
            frames = await FrameReader(resp).rest()
        async with asyncio.timeout(5):
            await closed.wait()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert resp.status == 200
    assert frames[-1].json()["error"]["code"] == "upstream_protocol_error"
    assert len(asked) == 1 and b"\r\nAccept-Encoding: identity\r\n" in asked[0]


MALFORMED_HEADS = {
    "status-not-a-number": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "header-over-the-line-limit": b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n",
    # RFC 9112 §6.1: a sender must not send both; a message with both is
    # how responses get smuggled.
    "chunked-and-a-length": (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
}


@pytest.mark.parametrize("head", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
async def test_a_malformed_response_head_is_a_protocol_error(head):
    """An upstream that answers with bytes that are not an HTTP/1.1 head
    broke the protocol; it did not lose the connection. docs/routing.md: a
    malformed answer is not sent again (a lost connection is), and the
    client is told the answer could not be read."""
    asked: list[bytes] = []
    closed = asyncio.Event()

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await read_request(reader))
        writer.write(head)
        await reader.read()
        closed.set()
        writer.close()

    async with serving(malformed) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("malformed", stream=False)) as resp:
            answer = await resp.json()
        async with asyncio.timeout(5):
            await closed.wait()  # the connection is not kept for another request
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert resp.status == 502 and answer["error"]["code"] == "upstream_protocol_error"
    assert len(asked) == 1


BROKEN_CONTINUATIONS = {
    "chunk-size-not-hex": b"zz\r\nnot hex\r\n",
    "chunk-longer-than-its-size": b"5\r\nhelloXX\r\n",
}


@pytest.mark.parametrize("continuation", BROKEN_CONTINUATIONS.values(), ids=BROKEN_CONTINUATIONS.keys())
async def test_a_body_malformed_after_the_first_token_ends_the_stream_at_once(continuation):
    """A chunked body that stops being chunked encoding mid-answer (RFC 9112
    §7.1): the stream ends with the in-stream protocol error as soon as the
    bad bytes arrive, not at the idle timeout (3 s here), whether the
    upstream then keeps its connection open or not."""
    first_token_seen = asyncio.Event()
    closed = asyncio.Event()

    async def breaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(CHUNK))
        await first_token_seen.wait()
        writer.write(continuation)
        await reader.read()
        closed.set()
        writer.close()

    async with serving(breaking) as port, gateway_on(
        port, upstream_idle_timeout_ms=3000
    ) as (upstream, v1), aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("break", stream=True)) as resp:
            frames = FrameReader(resp)
            while (frame := await frames.next()) is not None and "hello" not in (frame.data or ""):
                pass
            first_token_seen.set()
            rest = await frames.rest()
        async with asyncio.timeout(5):
            await closed.wait()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert rest[-1].json()["error"]["code"] == "upstream_protocol_error"


#: vLLM's error mid-stream in its flat ``ErrorResponse`` shape (the fields
#: not nested under ``error``), which it follows with ``data: [DONE]``.
FLAT_ERROR = (b'data: {"object":"error","message":"the engine died","type":"InternalServerError",'
              b'"param":null,"code":500}\n\n')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_flat_error_object_mid_stream_ends_the_answer_as_an_error(stream):
    """An OpenAI-compatible server that fails mid-answer writes its error
    object as a data event and then the terminator: vLLM's flat
    ``{"object": "error", "message", "code"}``. The answer so far is not a
    complete one: the client gets the error, never a truncated answer with
    ``[DONE]`` or a 200."""
    async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + chunked(CHUNK, FLAT_ERROR, b"data: [DONE]\n\n", b""))
        await reader.read()
        writer.close()

    async with serving(failing) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("flat", stream=stream)) as resp:
            if stream:
                frames = await FrameReader(resp).rest()
            else:
                answer = await resp.json()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    if stream:
        assert resp.status == 200
        assert not any(frame.data == "[DONE]" for frame in frames)
        assert [frame.json()["choices"][0]["delta"].get("content") for frame in frames[:-1]
                if frame.data is not None] == ["", "hello"]
        error = frames[-1].json()["error"]
        assert (error["code"], error["message"]) == ("upstream_500", "the engine died")
    else:
        assert resp.status == 502
        assert answer["error"]["code"] == "upstream_500"
        assert answer["error"]["message"] == "the engine died"


ERROR_EVENTS = {
    "json-without-an-error-member": b'event: error\ndata: {"message":"the engine died"}\n\n',
    "text": b"event: error\ndata: the engine died\n\n",
}


@pytest.mark.parametrize("error_event", ERROR_EVENTS.values(), ids=ERROR_EVENTS.keys())
async def test_an_error_event_mid_stream_ends_the_answer_as_an_error(error_event):
    """An OpenAI chat stream's events are unnamed; one named ``error`` is the
    upstream failing mid-answer (WHATWG HTML §9.2.6 dispatches it under that
    type), whatever its data holds. The answer so far is not complete: the
    client gets the error with the upstream's words, not the terminator that
    follows it."""
    async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError):
            while await read_request(reader):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             + chunked(CHUNK, error_event, b"data: [DONE]\n\n", b""))
        writer.close()

    async with serving(failing) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("named", stream=True)) as resp:
            frames = await FrameReader(resp).rest()
        async with http.post(v1 + "/chat/completions", json=chat("named", stream=False)) as whole:
            answer = await whole.json()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert resp.status == 200
    assert not any(frame.data == "[DONE]" for frame in frames)
    error = frames[-1].json()["error"]
    assert (error["code"], error["message"]) == ("upstream_500", "the engine died")
    assert whole.status == 502
    assert (answer["error"]["code"], answer["error"]["message"]) == ("upstream_500", "the engine died")


def event_stream(*events: bytes) -> bytes:
    body = b"".join(events)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def test_a_response_sent_to_an_idle_connection_is_never_an_answer():
    """A response the upstream writes to a kept-alive connection while no
    request is on it (a late second response, a stray ``408``) answers
    nothing (RFC 9112 §9.3: responses answer requests in order). The next
    request must not take it for its own answer: it is sent on another
    connection, and the one with the stray bytes is closed."""
    answered = asyncio.Event()
    stray_sent = asyncio.Event()
    stray_connection_closed = asyncio.Event()
    requests: list[tuple[int, bytes]] = []

    def answer(text: bytes) -> bytes:
        return event_stream(CHUNK.replace(b"hello", text), b"data: [DONE]\n\n")

    async def straying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = len({index for index, _ in requests})
        with suppress(asyncio.IncompleteReadError):
            while request := await read_request(reader):
                requests.append((connection, request))
                writer.write(answer(b"answer-%d" % len(requests)))
                if len(requests) == 1:
                    await answered.wait()
                    writer.write(answer(b"STRAY"))
                    stray_sent.set()
        if connection == 0:
            stray_connection_closed.set()
        writer.close()

    async with serving(straying) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("one", stream=False)) as first:
            first_answer = await first.json()
        answered.set()
        await stray_sent.wait()
        # A round trip through the gateway's loop: it has read the stray bytes.
        async with http.get(v1.removesuffix("/v1") + "/healthz") as health:
            assert health.status == 200
        async with http.post(v1 + "/chat/completions", json=chat("two", stream=False)) as second:
            second_answer = await second.json()
        assert first_answer["choices"][0]["message"]["content"] == "answer-1"
        assert second_answer["choices"][0]["message"]["content"] == "answer-2"
        assert [connection for connection, _ in requests] == [0, 1]
        async with asyncio.timeout(5):
            await stray_connection_closed.wait()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)


async def test_a_compressed_error_body_is_not_relayed_as_its_message():
    """The gateway asks for ``Accept-Encoding: identity`` and decodes no
    content coding. An error answer gzipped anyway (a proxy in front of the
    upstream) has a body nothing here can read: the client gets the
    upstream's status in words (with the 429's Retry-After), never the
    compressed bytes as the error's message."""
    body = zlib.compress(b'{"error":{"message":"slow down","code":"rate_limit_exceeded"}}', wbits=31)

    async def gzipping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError):
            while await read_request(reader):
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                             b"Content-Encoding: gzip\r\nRetry-After: 7\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()

    async with serving(gzipping) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("zipped", stream=False)) as resp:
            answer = await resp.json()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert (resp.status, resp.headers.get("Retry-After")) == (429, "7")
    assert answer["error"] == {"message": "Too Many Requests", "type": "rate_limit_error",
                               "code": "upstream_429"}


async def test_an_error_status_whose_body_never_ends_is_still_that_status():
    """The status line is the upstream's answer; its body only words for
    it. A 429 whose body stops coming is answered, at the first-token
    deadline (0.5 s here), as the 429 it is, with its Retry-After: not as
    a timeout, and not with the part of the body that came as its message."""
    closed = asyncio.Event()

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                     b"Retry-After: 7\r\nContent-Length: 100\r\n\r\n{\"error\": {\"mess")
        await reader.read()
        closed.set()
        writer.close()

    async with serving(stalling) as port, gateway_on(
        port, upstream_first_token_timeout_ms=500
    ) as (upstream, v1), aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("stall", stream=False)) as resp:
            answer = await resp.json()
        async with asyncio.timeout(5):
            await closed.wait()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert (resp.status, resp.headers.get("Retry-After")) == (429, "7")
    assert answer["error"] == {"message": "Too Many Requests", "type": "rate_limit_error",
                               "code": "upstream_429"}


#: llama.cpp's server writes a failure in a stream as an ``error`` field
#: line, and then the terminator.
LLAMA_CPP_ERROR = (b'error: {"code":400,"message":"the request exceeds the available context size, '
                   b'try increasing it","type":"exceed_context_size_error"}\n\n')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_error_line_of_llama_cpp_is_the_upstreams_error(stream):
    """An ``error:`` line is a field the SSE standard ignores (WHATWG HTML
    §9.2.6), so the stream after it looks like an empty, complete answer.
    From an OpenAI-compatible upstream it is llama.cpp's error: the client
    gets it, with its status and message, never a 200 answer or ``[DONE]``."""
    async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError):
            while await read_request(reader):
                writer.write(event_stream(LLAMA_CPP_ERROR, b"data: [DONE]\n\n"))
        writer.close()

    async with serving(failing) as port, gateway_on(port) as (upstream, v1), \
            aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("long", stream=stream)) as resp:
            if stream:
                frames = await FrameReader(resp).rest()
            else:
                answer = await resp.json()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    message = "the request exceeds the available context size, try increasing it"
    if stream:
        assert resp.status == 200
        assert not any(frame.data == "[DONE]" for frame in frames)
        error = frames[-1].json()["error"]
        assert (error["code"], error["message"]) == ("upstream_400", message)
    else:
        assert resp.status == 400
        assert answer["error"] == {"message": message, "type": "invalid_request_error",
                                   "code": "upstream_400"}
