"""A TCP relay in front of the gateway whose connections can all be cut at
once: a network that drops under a browser's open stream. ``sever()`` aborts
both sides of every connection relayed so far (an RST, not a clean close);
connections made afterwards are relayed as usual."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class SeveringProxy:
    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._host = target.hostname or "127.0.0.1"
        self._port = target.port or 80
        self._transports: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen on 127.0.0.1 and a free port; return the base URL."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    def sever(self) -> None:
        for transport in self._transports:
            transport.abort()  # type: ignore[attr-defined]
        self._transports.clear()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # An aborted transport ends its reads: every relay returns by itself.
        self.sever()
        async with asyncio.timeout(5):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(self._host, self._port)
            self._transports += [client_w.transport, upstream_w.transport]
            await asyncio.gather(_pipe(client_r, upstream_w), _pipe(upstream_r, client_w))
        finally:
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def severing_proxy(target_url: str) -> AsyncIterator[SeveringProxy]:
    proxy = SeveringProxy(target_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
