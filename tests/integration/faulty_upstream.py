"""A raw HTTP/1.1 upstream that misbehaves on request: each request's last
user message names what it does (a real socket, no HTTP library in the way,
so it can send what no library would: a broken chunk, a page for a stream)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_BEARER = re.compile(rb"(?i)\r\nauthorization: *bearer +(\S+)")

CHUNK = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"partial "},"finish_reason":null}]}\n\n')

#: A chunk with no choices and the usage only, as ``include_usage`` asks for.
USAGE_CHUNK = (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
               b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":0,'
               b'"total_tokens":3}}\n\n')


def _content(text_json: str) -> bytes:
    """A chunk whose delta's content is ``text_json`` (JSON, escapes as written)."""
    return (b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":' + text_json.encode()
            + b'},"finish_reason":null}]}\n\n')


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


class FaultyUpstream:
    """Behaviours, by a word in the prompt:

    ``echo-key``      401 with OpenAI's "Incorrect API key provided: <the key>"
    ``echo-key-mid``  200, one chunk, then an in-stream error quoting the key
    ``html``          200 text/html page (a captive portal, a misrouted proxy)
    ``bad-chunk``     200, one chunk, then a chunk size that is not hex
    ``drop``          200, one chunk, then the connection closes
    ``status-page``   502 with an HTML body
    ``moved``         301 to another URL (an upstream whose address changed)
    ``key-in-text``   401 with a plain-text body quoting the key and the prompt
                      (as a validation error quotes ``input_value=...``)
    ``key-in-code``   429 whose error code and Retry-After quote the key
    ``rate-limited``  429 ``rate_limit_exceeded``, ``Retry-After: 7``
    ``throttled``     429 ``rate_limit_exceeded`` without a Retry-After
    ``surrogate``     200, an answer holding a lone UTF-16 surrogate: ``hi \\ud800 there``
    ``split-emoji``   200, ``smile `` then an emoji's two UTF-16 halves in two chunks
    ``silent``        no answer at all, not even a status line, until the
                      gateway closes the connection
    ``usage-flood``   200, then usage-only chunks (no content) without end,
                      until the gateway closes the connection (``flooded``
                      counts them)

    With ``held`` in the prompt too, the answer waits until the test sets
    ``release`` (``held`` is set once such a request has arrived): the
    gateway's stream is open meanwhile, for other requests to join.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.flooded = 0
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            body = await reader.readexactly(int(match.group(1))) if match else b""
            self.requests += 1
            key_match = _BEARER.search(head)
            key = key_match.group(1) if key_match else b"(none)"
            prompt = json.loads(body)["messages"][-1]["content"] if body else ""
            if "silent" in prompt:
                await reader.read()  # until the gateway gives up and closes
                return
            if "usage-flood" in prompt:
                await self._flood_usage(writer)
                return
            if "held" in prompt:
                self.held.set()
                await self.release.wait()
            # Each answer ends its connection, and says so (RFC 9112 §9.6):
            # no request of the gateway's goes out on a connection closing.
            answer = self._answer(prompt, key).replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _flood_usage(self, writer: asyncio.StreamWriter) -> None:
        """Usage-only chunks, 16 a write, until the connection goes."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(_chunked(*[USAGE_CHUNK] * 16))
            self.flooded += 16
            await writer.drain()

    @staticmethod
    def _answer(prompt: str, key: bytes) -> bytes:
        sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        incorrect = b"Incorrect API key provided: " + key + b". You can find your API key at ..."
        if "echo-key-mid" in prompt:
            error = json.dumps({"error": {"message": incorrect.decode(), "type": "invalid_request_error",
                                          "code": "invalid_api_key"}}).encode()
            return sse + _chunked(CHUNK, b"data: " + error + b"\n\n") + b"0\r\n\r\n"
        if "echo-key" in prompt:
            error = json.dumps({"error": {"message": incorrect.decode(), "type": "invalid_request_error",
                                          "code": "invalid_api_key"}}).encode()
            return (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(error), error))
        if "key-in-text" in prompt:
            text = b"Unauthorized: key " + key + b", input_value='" + prompt.encode() + b"'"
            return (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(text), text))
        if "key-in-code" in prompt or "rate-limited" in prompt:
            echo = "key-in-code" in prompt
            code = "code_Bearer " + key.decode() if echo else "rate_limit_exceeded"
            error = json.dumps({"error": {"message": "slow down", "type": "requests",
                                          "code": code}}).encode()
            retry_after = b"7 " + key if echo else b"7"
            return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Retry-After: %s\r\nContent-Length: %d\r\n\r\n%s" % (retry_after, len(error), error))
        if "throttled" in prompt:
            error = json.dumps({"error": {"message": "slow down", "type": "requests",
                                          "code": "rate_limit_exceeded"}}).encode()
            return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(error), error))
        if "html" in prompt:
            page = b"<html><body>Please log in to the network</body></html>"
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(page), page))
        if "status-page" in prompt:
            page = b"<html><body><h1>502 Bad Gateway</h1>nginx at 10.0.0.7:8000</body></html>"
            return (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(page), page))
        if "moved" in prompt:
            return (b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://127.0.0.1:1/v2/chat\r\n"
                    b"Content-Length: 0\r\n\r\n")
        if "bad-chunk" in prompt:
            return sse + _chunked(CHUNK) + b"zz\r\nnot hex\r\n"
        if "surrogate" in prompt:
            return sse + _chunked(_content('"hi \\ud800 there"'), b"data: [DONE]\n\n") + b"0\r\n\r\n"
        if "split-emoji" in prompt:
            return sse + _chunked(_content('"smile "'), _content('"\\ud83d"'), _content('"\\ude00"'),
                                  b"data: [DONE]\n\n") + b"0\r\n\r\n"
        if "drop" in prompt:
            return sse + _chunked(CHUNK)
        return sse + _chunked(CHUNK, b"data: [DONE]\n\n") + b"0\r\n\r\n"


@asynccontextmanager
async def faulty_upstream() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    upstream._server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.port = upstream._server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        upstream._server.close()
        for task in list(upstream._tasks):
            task.cancel()
        await asyncio.gather(*upstream._tasks, return_exceptions=True)
        await upstream._server.wait_closed()
