"""A stand-in peer for tests: an aiohttp application on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` served for the block; yields its base URL (no trailing slash)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def event_stream_upstream(path: str, answer: Callable[[Mapping[str, Any]], bytes]) -> web.Application:
    """An upstream whose POST ``path`` answers ``text/event-stream`` with the
    bytes ``answer`` makes of the request's JSON body, in one write."""

    async def stream(request: web.Request) -> web.StreamResponse:
        body = answer(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(path, stream)
    return app
