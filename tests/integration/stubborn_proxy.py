"""A deliberately broken HTTP face, for proving the TTFT suite's cancel line can fail.

``StubbornProxy`` forwards ``POST /v1/chat/completions`` to an upstream over
HTTP/1.1 and streams the answer back -- and when its client leaves, it keeps
reading the upstream to the end. That is the naive proxy, not a contrivance:
aiohttp's runner defaults to ``handler_cancellation=False``, so
the handler learns of the departure only when a write fails, and a proxy that
then "finishes cleanly" holds the upstream request (and the model's GPU time)
for nothing. The suite must see that from the simulator's log alone.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web


class StubbornProxy:
    def __init__(self, upstream_url: str) -> None:
        """``upstream_url``: the upstream's base URL, ``http://host:port/v1``."""
        self._upstream = upstream_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen on 127.0.0.1 and a free port; return the base URL (``.../v1``)."""
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._forward)
        # The broken part: the default, no handler cancellation. The short
        # shutdown timeout only keeps the test's teardown quick.
        self._runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self.url

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        async with self._session.post(
            self._upstream + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "text/event-stream")},
            )
            await response.prepare(request)
            client_gone = False
            async for chunk in upstream.content.iter_any():
                if client_gone:
                    continue  # the bug: read on, though nobody is listening
                try:
                    await response.write(chunk)
                except ConnectionResetError:
                    client_gone = True
        return response
