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

