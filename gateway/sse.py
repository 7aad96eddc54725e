"""Server-sent events: framing, the early ping, keepalive.

Frames are built as bytes once and written whole (one ``write`` per frame, so
the keepalive ping of aiohttp-sse can never land inside one). The response
itself is aiohttp-sse's ``EventSourceResponse``: it sets the SSE headers
(``Cache-Control: no-cache``, ``X-Accel-Buffering: no`` for nginx), runs the
keepalive ping every ``PING_INTERVAL_S`` and aborts a client that stops
reading (TCP_USER_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway import json_codec

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


def dumps(value: Any) -> str:
    """Compact JSON as text (for ``web.json_response``)."""
    return json_codec.dumps(value).decode()


def data_frame(payload: Any) -> bytes:
    """``data: <json>`` -- compact JSON has no newlines, so one data line."""
    return b"data: " + json_codec.dumps(payload) + b"\n\n"


def event_frame(event: str, payload: Any, *, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id is not None else f"event: {event}\ndata: "
    return head.encode() + json_codec.dumps(payload) + b"\n\n"


def comment_frame(text: str) -> bytes:
    # A comment: SDKs and EventSource ignore it (WHATWG SSE §9.2.6).
    return b": " + text.encode() + b"\n\n"


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response, with two changes.

    The status line and headers wait for the first write -- the ping, right
    after -- so both leave in one packet (aiohttp's own Response does the
    same). And the keepalive pings only a stream that has been silent for a
    whole interval (ARCHITECTURE: "again every PING_INTERVAL_S while nothing
    else was sent"), not every interval regardless.
    """

    _send_headers_immediately = False
    _last_write = 0.0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self._last_write = time.monotonic()
        await super().write(data)

    async def _ping(self) -> None:
        while True:
            silent_for = time.monotonic() - self._last_write
            await asyncio.sleep(max(0.0, self._ping_interval - silent_for))
            if time.monotonic() - self._last_write < self._ping_interval:
                continue  # something was sent meanwhile: no ping needed yet
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.write(PING)
            except TimeoutError:
                self._abort_transport()  # a client that stopped reading
                break
            except (ConnectionResetError, RuntimeError):
                break  # gone, or the body already ended


async def open_event_stream(
    request: web.Request, *, ping_interval_s: float, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """Send the headers and ``: ping`` at once, before the upstream answers:
    the client (and every proxy and load balancer between) sees bytes now."""
    response = _EventStream(
        headers=headers,
        sep="\n",
        allow_all_methods=True,
        ping_interval=ping_interval_s,
    )
    await response.prepare(request)  # starts aiohttp-sse's keepalive task
    try:
        await response.write(PING)
    except BaseException:
        response.stop_streaming()  # the caller never gets the response to stop it
        raise
    return response


async def close_event_stream(response: EventSourceResponse, last_frame: bytes = b"") -> None:
    """Stop the keepalive (and wait for it), then write the last frame and
    the end of the chunked body together."""
    response.stop_streaming()
    await response.wait()
    await response.write_eof(last_frame)
