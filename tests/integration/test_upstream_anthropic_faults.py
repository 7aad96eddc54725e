"""The gateway in front of an Anthropic-format upstream that sends what a
real Messages API endpoint may send but a well-behaved answer rarely does:
a raw HTTP/1.1 loopback peer writing exact bytes, over real sockets, with
the gateway's own transport, source and provider."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.integration.peer_server import serving
from tests.integration.sse_frames import Frame, FrameReader, openai_text
from tests.integration.test_upstream_http1_faults import chat, chunked, gateway_on, read_request

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def event(name: str, payload: dict[str, object]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(payload).encode())


def message_start(usage: dict[str, int]) -> bytes:
    return event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}})


def text_block(index: int, text: str) -> bytes:
    return (event("content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}})
            + event("content_block_delta", {"type": "content_block_delta", "index": index,
                                            "delta": {"type": "text_delta", "text": text}})
            + event("content_block_stop", {"type": "content_block_stop", "index": index}))


def message_delta(stop_reason: str, usage: dict[str, int]) -> bytes:
    return event("message_delta", {"type": "message_delta", "usage": usage,
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": None}})


MESSAGE_STOP = event("message_stop", {"type": "message_stop"})
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def answering(body: bytes, asked: list[bytes]) -> Serve:
    """A peer that answers every request on its connection with ``body``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                asked.append(await read_request(reader))
                writer.write(HEAD + chunked(body) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return serve


USAGE_SPLITS = {
    "message_delta-repeats-input_tokens-only": (
        {"input_tokens": 5, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100,
         "output_tokens": 1},
        {"input_tokens": 5, "output_tokens": 7}),
    "cache-counts-in-message_delta-only": (
        {"input_tokens": 5, "output_tokens": 1},
        {"cache_creation_input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 7}),
}


@pytest.mark.parametrize(("start_usage", "delta_usage"), USAGE_SPLITS.values(), ids=USAGE_SPLITS.keys())
async def test_the_prompt_count_sums_each_count_as_last_given(start_usage, delta_usage):
    """Usage counts are cumulative and message_delta may repeat only some of
    them: each count stands as last given, whichever event gave it. The
    prompt count is 5 input + 20 written + 100 read = 125, and the
    Messages API's input_tokens 5, not 5 - 120."""
    body = (message_start(start_usage) + text_block(0, "hi") + message_delta("end_turn", delta_usage)
            + MESSAGE_STOP)
    asked: list[bytes] = []
    async with serving(answering(body, asked)) as port, gateway_on(
        port, upstream_format="anthropic"
    ) as (upstream, v1), aiohttp.ClientSession() as http:
        async with http.post(v1 + "/chat/completions", json=chat("cached", stream=False)) as resp:
            completion = await resp.json()
        async with http.post(v1 + "/messages", json=chat("cached too", stream=False)) as resp:
            anthropic_message = await resp.json()
        assert upstream.in_flight == 0

    assert len(asked) == 2
    assert completion["usage"] == {"prompt_tokens": 125, "completion_tokens": 7, "total_tokens": 132,
                                   "prompt_tokens_details": {"cached_tokens": 100}}
    assert anthropic_message["usage"] == {"input_tokens": 5, "output_tokens": 7,
                                          "cache_creation_input_tokens": 20,
                                          "cache_read_input_tokens": 100}


def text_delta(index: int, text: str) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": {"type": "text_delta", "text": text}})


OVERLOADED = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def answered_text(route: str, frames: list[Frame]) -> str:
    if route == "/chat/completions":
        return openai_text(frames)
    return "".join(f.json()["delta"]["text"] for f in frames if f.event == "content_block_delta")


@pytest.mark.parametrize("route", ["/chat/completions", "/messages"])
async def test_text_read_with_an_error_event_reaches_the_client_before_it(route):
    """One read may hold an answer's last deltas and the error event that
    ends it. After the first token the stream ends with the in-stream error,
    and the text that came before it in the same read is the client's
    first: "hi", " there", then the error, in the client's API shape."""
    first_token_seen = asyncio.Event()
    closed = asyncio.Event()

    async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunked(
            message_start({"input_tokens": 5, "output_tokens": 1})
            + event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
            + text_delta(0, "hi")))
        await first_token_seen.wait()
        writer.write(chunked(text_delta(0, " there") + OVERLOADED))
        await reader.read()
        closed.set()
        writer.close()

    async with serving(failing) as port, gateway_on(
        port, upstream_format="anthropic"
    ) as (upstream, v1), aiohttp.ClientSession() as http:
        async with http.post(v1 + route, json=chat("overloaded", stream=True)) as resp:
            reader = FrameReader(resp)
            while answered_text(route, reader.frames) != "hi":
                assert await reader.next() is not None
            first_token_seen.set()
            frames = await reader.rest()
        async with asyncio.timeout(5):
            await closed.wait()
        assert (upstream.transport.connection_count(), upstream.in_flight) == (0, 0)

    assert resp.status == 200
    assert answered_text(route, frames) == "hi there"
    last = frames[-1].json()
    if route == "/chat/completions":
        assert last == {"error": {"message": "Overloaded", "type": "upstream_error",
                                  "code": "overloaded_error"}}
    else:
        assert frames[-1].event == "error" and last["error"]["message"] == "Overloaded"
