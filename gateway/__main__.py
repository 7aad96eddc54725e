"""``python -m gateway``: settings from the environment, serve, drain on SIGTERM.

Shutdown (SIGTERM or SIGINT): stop accepting connections and turn /readyz to
503 at once; let streams in flight finish for up to DRAIN_TIMEOUT_S; then end
the rest with an in-stream error (their upstream streams are reset) and exit 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import structlog
from aiohttp import web

from gateway.app import make_app
from gateway.config import ConfigError, Settings
from gateway.errors import ShuttingDown
from gateway.logs import configure_logging
from gateway.state import STATE

log = structlog.get_logger("gateway")


async def serve(settings: Settings) -> None:
    app = make_app(settings)
    # handler_cancellation=True, as aiohttp's test server has it: a client that
    # disconnects cancels its handler at once, even while it waits for the
    # first token (FIELD-NOTES: the default False notices only at a write).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    state = app[STATE]
    bound = runner.addresses[0]
    url = f"http://{settings.host}:{bound[1]}"
    print(f"llm-stream-gateway listening on {url} (upstream: {state.upstream_url})", flush=True)
    log.info("started", url=url, upstream=state.upstream_url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        state.draining = True
        await site.stop()  # no new connections; /readyz now answers 503
        log.info("draining", streams=state.active_streams, timeout_s=settings.drain_timeout_s)
        try:
            async with asyncio.timeout(settings.drain_timeout_s):
                await state.registry.wait_idle()
        except TimeoutError:
            log.warning("drain timeout: ending the remaining streams")
        await state.registry.aclose(ShuttingDown("the gateway is shutting down"))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    log.info("stopped")


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"llm-stream-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
