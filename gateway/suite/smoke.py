"""``python -m gateway.suite.smoke [URL]`` (``bin/smoke-ttft``): the early-bytes check.

One streaming request whose first token is slow (``[sim ttft_ms=1500]``: the
simulator obeys it; a real model reads it as text and is slow or not on its
own), timed for the first byte and the first token. A gateway that sends
nothing until the upstream answers -- the classic cause of load balancers
cutting long first tokens, and of "is it even working?" -- shows a first byte
as late as its first token and fails: the first byte must come within 100 ms.

Without a URL it starts its own simulator and gateway, as ``make ttft`` does.
Exit status 0 on pass, 1 on fail (or a failed request), 3 when the system
could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp

from gateway.errors import GatewayError
from gateway.suite.client import DEFAULT_MODEL, StreamResult, chat_body, stream_chat
from gateway.suite.config import SuiteConfig
from gateway.suite.processes import local_system

SLOW_PROMPT = "Smoke test: take your time before the first word. [sim ttft_ms=1500]"
MAX_FIRST_BYTE_MS = 100.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoke-ttft",
        description="One slow streaming request: the first byte must come at once.",
    )
    parser.add_argument("url", nargs="?", help="a gateway's base URL, e.g. https://host/v1, or "
                        "its address alone, as bin/check-alerts takes it (default: start a "
                        "local simulator and gateway)")
    parser.add_argument("--max-first-byte-ms", type=float, default=MAX_FIRST_BYTE_MS)
    parser.add_argument("--api-key", default=os.environ.get("TTFT_API_KEY") or None)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    return parser


def api_base(url: str) -> str:
    """The API base of ``url``: a gateway's address alone (no path, the form
    ``make run`` prints and ``bin/check-alerts`` takes) serves its API under
    ``/v1``; any other path is taken as the base itself."""
    base = url.rstrip("/")
    return base + "/v1" if urlsplit(base).path == "" else base


async def probe(base_url: str, *, api_key: str | None, model: str) -> StreamResult:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        return await stream_chat(
            session, base_url.rstrip("/") + "/chat/completions",
            chat_body(SLOW_PROMPT, model=model, max_tokens=8),
            label="smoke", api_key=api_key, timeout_s=30.0,
        )


async def _run(args: argparse.Namespace) -> tuple[str, StreamResult]:
    if args.url:
        base_url = api_base(args.url)
        return base_url, await probe(base_url, api_key=args.api_key, model=args.model)
    async with local_system(SuiteConfig()) as endpoints:
        result = await probe(endpoints.gateway_url, api_key=None, model=args.model)
        return endpoints.gateway_url, result


def verdict(result: StreamResult, max_first_byte_ms: float) -> tuple[list[str], bool]:
    """The lines to print (the verdict last) and whether the check passed."""
    ttfb, ttft = result.ttfb_ms, result.ttft_ms
    lines = [f"Time to first token: {'n/a' if ttft is None else f'{ttft:.0f} ms'}"]
    if result.error is not None:
        lines.append(f"Request failed: {result.error}")
    ok = result.error is None and ttfb is not None and ttfb <= max_first_byte_ms
    shown = "n/a" if ttfb is None else f"{ttfb:.1f} ms"
    lines.append(f"Time to first byte: {shown} (<= {max_first_byte_ms:g}) {'PASS' if ok else 'FAIL'}")
    return lines, ok


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url, result = asyncio.run(_run(args))
    except GatewayError as exc:
        print(f"smoke-ttft: {exc}", file=sys.stderr)
        return 3
    lines, ok = verdict(result, args.max_first_byte_ms)
    print(f"smoke-ttft against {url}")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
