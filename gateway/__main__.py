"""``python -m gateway``: settings from the environment, serve, drain on SIGTERM.

Shutdown, on SIGTERM or SIGINT:

1. At once: ``/readyz`` and new model requests answer 503 (``draining``), the
   listening socket closes (a new connection is refused, so nginx passes the
   request to another gateway), and idle keep-alive connections are closed;
   a connection busy with a response closes when that response ends. This is
   what Go's ``http.Server.Shutdown`` does: leaving idle connections open
   would have nginx keep sending new requests to a gateway that is leaving.
2. Streams in flight finish on their own for up to DRAIN_TIMEOUT_S.
3. Then (or at a second signal: an operator who wants it over now) the rest
   end with an in-stream error ``shutting_down`` (retryable) and their upstream
   streams are reset. Exit status 0: a drain is a normal stop, and systemd's
   ``Restart=on-failure`` must not restart it.

The 503 answers of step 1 are for requests that were already read when the
signal came; any later one has no connection to arrive on.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog
from aiohttp import web

from gateway import json_codec
from gateway.app import make_app
from gateway.config import ConfigError, Settings
from gateway.errors import ShuttingDown
from gateway.logs import configure_logging
from gateway.state import STATE, GatewayState

log = structlog.get_logger("gateway")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Net new container objects between two young-generation collections
#: (CPython's default is 700). Each collection walks the whole in-flight
#: state of the streams being relayed; at 200 streams the default made
#: ~50 collections a second (tests/perf/PROFILES.md, 11).
GC_YOUNG_THRESHOLD = 7000


class _Signals:
    """Counts SIGTERM/SIGINT: the first starts the drain, the second cuts it short."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    def received(self) -> None:
        if self.first.is_set():
            self.second.set()
        self.first.set()


async def _drain(state: GatewayState, timeout_s: float, hurry: asyncio.Event) -> None:
    """Until no stream is left, ``timeout_s`` passed, or ``hurry`` is set;
    then end whatever is left (in-stream error, upstream reset)."""
    idle = asyncio.create_task(state.registry.wait_idle(), name="drain-wait-idle")
    hurried = asyncio.create_task(hurry.wait(), name="drain-second-signal")
    try:
        done, _ = await asyncio.wait(
            {idle, hurried}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (idle, hurried):
            task.cancel()
        await asyncio.gather(idle, hurried, return_exceptions=True)
    if idle in done:
        log.info("drained")
    else:
        remaining = state.registry.statistics()
        reason = "second signal" if hurried in done else "drain timeout"
        log.warning("ending the remaining streams", reason=reason, actors=remaining.actors,
                    subscribers=remaining.subscribers)
    await state.registry.aclose(ShuttingDown("the gateway is shutting down; retry"))


async def serve(settings: Settings) -> None:
    app = make_app(settings)
    # handler_cancellation=True, as aiohttp's test server has it: a client that
    # disconnects cancels its handler at once, even while it waits for the
    # first token (FIELD-NOTES: the default False notices only at a write).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    signals = _Signals()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, signals.received)
    try:
        # Workers of one supervisor share the port (gateway/workers.py).
        site = web.TCPSite(
            runner, settings.host, settings.port, reuse_port=settings.worker_index is not None
        )
        await site.start()
        _settle_garbage_collector()
        state = app[STATE]
        bound = runner.addresses[0]
        url = f"http://{settings.host}:{bound[1]}"
        worker = ""
        if settings.worker_index is not None:
            worker = f", worker {settings.worker_index + 1} of {settings.workers}"
        print(f"llm-stream-gateway listening on {url} (upstream: {state.upstream_url}{worker})",
              flush=True)
        extra: dict[str, object] = {}
        if settings.worker_index is not None:
            extra["worker"] = settings.worker_index
        if state.cluster is not None:
            extra["cluster"] = state.cluster.me.url
        log.info("started", url=url, upstream=state.upstream_url, **extra)

        await signals.first.wait()
        # One tick, no await in between: from here no request can start
        # anything new (draining), arrive (listener closed) or wait on an
        # idle connection (closed).
        state.draining = True
        await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()
        log.info("draining", streams=state.active_streams, timeout_s=settings.drain_timeout_s)
        await _drain(state, settings.drain_timeout_s, signals.second)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        # Waits for the handlers to write their last frame, then closes
        # every connection and runs the app's cleanup (transport, simulator).
        await runner.cleanup()
    log.info("stopped")


def _settle_garbage_collector() -> None:
    """Everything built so far (modules, the app, the pools) lives as long
    as the process: freeze it out of every later collection, so a full one
    walks only the objects of the streams open at that moment, not the
    ~43,000 of the code. And collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_event_loop(main: Coroutine[Any, Any, None], *, use_uvloop: bool) -> None:
    """uvloop when it is installed (the ``fast`` extra) and not turned off
    with GATEWAY_UVLOOP=0: its transports cut the per-write cost that
    dominates many concurrent streams (BENCHMARKS.md)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"llm-stream-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from gateway.workers import as_worker, supervise

        settings = as_worker(settings, os.environ)
        if settings.worker_index is None:
            return supervise(settings, os.environ)
    if not settings.orjson:
        json_codec.use_standard_library()
    run_event_loop(serve(settings), use_uvloop=settings.uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
