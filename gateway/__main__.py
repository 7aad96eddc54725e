"""``python -m gateway``: settings from the environment, serve, drain on SIGTERM.

Shutdown, on SIGTERM, SIGINT or SIGHUP (a closed terminal, or a reload
habit, must not cut streams: there is no reload, so SIGHUP is a drain too;
the ``draining`` log line names the signal):

1. At once: ``/readyz`` and new model requests answer 503 (``draining``), the
   listening socket closes (a new connection is refused, so nginx passes the
   request to another gateway), and idle keep-alive connections are closed;
   a connection busy with a response closes when that response ends. This is
   what Go's ``http.Server.Shutdown`` does: leaving idle connections open
   would have nginx keep sending new requests to a gateway that is leaving.
2. Streams in flight finish on their own for up to DRAIN_TIMEOUT_S, and so
   do requests still being read or answered (a body still arriving is
   answered 503 once it is in).
3. Then (or at a second signal: an operator who wants it over now) the rest
   end with an in-stream error ``shutting_down`` (retryable) and their upstream
   streams are reset; a client that does not read its last frame within
   LAST_FRAME_TIMEOUT_S has its connection closed. Exit status 0: a drain is a
   normal stop, and systemd's ``Restart=on-failure`` must not restart it.

The 503 answers (``Connection: close``) of step 1 are for requests already on
their way when the signal came, or sent on a connection busy with a response;
every response from then on closes its connection (gateway/connection.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import structlog
from aiohttp import web

from gateway import json_codec
from gateway.app import make_app, make_listener
from gateway.config import ConfigError, Settings
from gateway.connection import Connections, ListenError, listen_url
from gateway.errors import ShuttingDown
from gateway.logs import configure_logging, say
from gateway.state import STATE, GatewayState

log = structlog.get_logger("gateway")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Net new container objects between two young-generation collections
#: (CPython's default is 700). Each collection walks the whole in-flight
#: state of the streams being relayed; at 200 streams the default made
#: ~50 collections a second.
GC_YOUNG_THRESHOLD = 7000

#: After the drain has ended every stream, how long a handler may take to
#: write its last frame before it is cancelled and its connection closed. A
#: client that stops reading (gone without a FIN, or stuck) holds its
#: handler in a write that never completes: aiohttp's own wait, 60 s, would
#: keep the process past systemd's TimeoutStopSec and the supervisor's kill.
LAST_FRAME_TIMEOUT_S = 1.0


class _Signals:
    """Counts stop signals: the first starts the drain, the second cuts it short."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        #: The name of the first one, for the ``draining`` line.
        self.name = ""

    def received(self, signum: int) -> None:
        if self.first.is_set():
            self.second.set()
        else:
            self.name = signal.Signals(signum).name
        self.first.set()


async def _drain(
    state: GatewayState, connections: Connections, timeout_s: float, hurry: asyncio.Event
) -> None:
    """Until no stream and no request is left (a body still arriving
    included), ``timeout_s`` passed, or ``hurry`` is set; then end whatever
    is left (in-stream error, upstream reset)."""

    async def quiet() -> None:
        await state.registry.wait_idle()
        await connections.wait_quiet()

    idle = asyncio.create_task(quiet(), name="drain-wait-idle")
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
                    subscribers=remaining.subscribers, requests=connections.busy)
    await state.registry.aclose(ShuttingDown("the gateway is shutting down; retry"))


async def serve(settings: Settings) -> None:
    app = make_app(settings)
    # handler_cancellation=True, as aiohttp's test server has it: a client that
    # disconnects cancels its handler at once, even while it waits for the
    # first token (aiohttp's default, False, notices it only at a write).
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=LAST_FRAME_TIMEOUT_S
    )
    await runner.setup()
    signals = _Signals()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, signals.received, signum)
    listener = make_listener(runner, settings)
    try:
        try:
            # Workers of one supervisor share the port (gateway/workers.py).
            await listener.start(
                settings.host, settings.port, reuse_port=settings.worker_index is not None
            )
        except OSError as exc:
            raise ListenError.from_os_error(exc, settings.host, settings.port) from exc
        _settle_garbage_collector()
        state = app[STATE]
        url = listen_url(settings.host, listener.port)
        if state.simulated:
            upstream = "simulator"
            say("llm-stream-gateway: WARNING: no UPSTREAM_URL set: serving the built-in "
                "SIMULATOR, whose answers are made up; set UPSTREAM_URL to reach a real model",
                file=sys.stderr)
            log.warning("serving the built-in simulator: no UPSTREAM_URL set", upstream="simulator")
        else:
            upstream = state.upstream_url
        worker = ""
        if settings.worker_index is not None:
            worker = f", worker {settings.worker_index + 1} of {settings.workers}"
        say(f"llm-stream-gateway listening on {url} (upstream: {upstream}{worker})")
        extra: dict[str, object] = {}
        if state.cluster is not None:
            extra["cluster"] = state.cluster.me.url
        log.info("started", url=url, upstream=state.upstream_url, simulated=state.simulated, **extra)

        await signals.first.wait()
        # One tick, no await in between: from here no request can start
        # anything new (draining), arrive (listener closed) or wait on an
        # idle connection (closed).
        state.draining = True
        listener.stop_listening()
        closed = listener.connections.close_idle()
        log.info("draining", signal=signals.name, streams=state.active_streams,
                 timeout_s=settings.drain_timeout_s, idle_connections_closed=closed)
        await _drain(state, listener.connections, settings.drain_timeout_s, signals.second)
    finally:
        # Waits for the handlers to write their last frame (for up to
        # LAST_FRAME_TIMEOUT_S, then cancels them), closes every connection
        # and runs the app's cleanup (transport, simulator). The signal
        # handlers stay until it is done: a further signal meanwhile is one
        # more request to stop, not a kill that loses the exchange log's
        # last records, the cluster's leave and the exit status 0.
        try:
            listener.stop_listening()
            await runner.cleanup()
            await listener.aclose()
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
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


#: Exit statuses. A bad configuration value cannot be fixed by a restart
#: (the unit's RestartPreventExitStatus=2); a busy port may free itself
#: (an old process still draining), so systemd may try again.
EXIT_OK, EXIT_CANNOT_LISTEN, EXIT_BAD_CONFIGURATION = 0, 1, 2


class _Recorder(dict[str, str]):
    """An empty environment that notes every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.names:
            self.names.append(key)
        return super().get(key, default)


def environment_variables() -> list[str]:
    """Every variable ``Settings.from_env`` reads, in the order it reads them."""
    recorder = _Recorder()
    Settings.from_env(recorder)
    return recorder.names


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    names = environment_variables()
    lines = [" ".join(names[i:i + 3]) for i in range(0, len(names), 3)]
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="llm-stream-gateway: a streaming LLM gateway (OpenAI-compatible API,\n"
        "coalescing of identical requests, cancellation in one tick). Configured by\n"
        "the environment; with no UPSTREAM_URL it serves the built-in simulator.",
        epilog="environment variables (every one with its default and meaning: "
        "docs/configuration.md):\n  " + "\n  ".join(lines)
        + "\n\nexit status: 0 stopped (drained on SIGTERM, SIGINT or SIGHUP), "
        "1 cannot listen on the port, "
        "2 bad configuration",
    )
    parser.add_argument(
        "--require-upstream", action="store_true",
        help="refuse to start (exit 2) unless UPSTREAM_URL or GATEWAY_CONFIG is set, "
        "instead of serving the built-in simulator (the systemd unit passes it)",
    )
    return parser.parse_args(argv)


def _missing_upstream(env: Mapping[str, str]) -> bool:
    return not any(env.get(name, "").strip() for name in ("UPSTREAM_URL", "GATEWAY_CONFIG"))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        say(f"llm-stream-gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    if arguments.require_upstream and _missing_upstream(os.environ):
        say("llm-stream-gateway: neither UPSTREAM_URL nor GATEWAY_CONFIG is set, and "
            "--require-upstream refuses to serve the built-in simulator", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    if not settings.orjson:
        json_codec.use_standard_library()
    if settings.workers > 1:
        from gateway.workers import as_worker

        settings = as_worker(settings, os.environ)
    # Its JSON is json_codec's; a worker's lines say which worker wrote them.
    configure_logging(settings.log_level, settings.log_format, worker=settings.worker_index)
    if settings.workers > 1:
        from gateway.workers import reserve_port, supervise

        if settings.worker_index is None:
            try:
                placeholder = reserve_port(settings)
            except OSError as exc:
                say(f"llm-stream-gateway: {ListenError.from_os_error(exc, settings.host, settings.port)}",
                    file=sys.stderr)
                return EXIT_CANNOT_LISTEN
            return supervise(settings, os.environ, placeholder)
    try:
        run_event_loop(serve(settings), use_uvloop=settings.uvloop)
    except ListenError as exc:
        say(f"llm-stream-gateway: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    except ConfigError as exc:
        # A value only its first use can judge (EXCHANGE_LOG_URL's options).
        say(f"llm-stream-gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
