"""``python -m gateway.sim``: run the simulated upstream as its own process.

Prints exactly one line, ``upstream-sim listening on http://HOST:PORT``, once
the port is bound (``--port 0`` picks a free one: read it from that line), and
stops cleanly on SIGTERM or SIGINT with status 0. Knobs come from ``SIM_*``
variables, then the flags (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence

from gateway.sim.profile import KnobError, SimProfile, add_knob_arguments, profile_from_process
from gateway.sim.server import SimServer

DEFAULT_PORT = 8001


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstream-sim",
        description="A simulated LLM upstream: OpenAI and Anthropic APIs over HTTP/1.1 and h2c.",
    )
    parser.add_argument("--host", default=os.environ.get("SIM_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port",
        type=int,
        # A string default goes through type=int too: a bad SIM_PORT is a usage error.
        default=os.environ.get("SIM_PORT", str(DEFAULT_PORT)),
        help=f"0 picks a free port (default: {DEFAULT_PORT})",
    )
    parser.add_argument("--tls-cert", help="serve TLS (ALPN h2, http/1.1) with this PEM chain")
    parser.add_argument("--tls-key", help="the private key of --tls-cert")
    add_knob_arguments(parser)
    return parser


def _tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def serve(profile: SimProfile, host: str, port: int, tls: ssl.SSLContext | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sim = SimServer(profile)
    await sim.start(host, port, ssl=tls)
    try:
        print(f"upstream-sim listening on {sim.origin}", flush=True)
        await stop.wait()
    finally:
        await sim.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        profile = profile_from_process(args, os.environ)
    except KnobError as exc:
        parser.error(str(exc))  # exits with status 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tls = _tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        asyncio.run(serve(profile, args.host, args.port, tls))
    except OSError as exc:
        print(f"upstream-sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
