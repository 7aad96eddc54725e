"""The floor under the CPU table: a bare aiohttp SSE handler.

It answers a streamed chat request as the simulator would (the prompt's
``[sim ttft_ms=.. itl_ms=.. tokens=N]`` directive sets the timing), from its
own timers, with no upstream, no validation, no coalescing: the request
parsed, the body read and decoded, the head and a ``: ping``, one frame per
token, ``[DONE]`` with the end of the body. What this costs per request is
what aiohttp and the event loop take for the same bytes on the wire, which
no gateway built on them can go below.

``python -m tests.perf.floor_sse [--port N]`` prints ``listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

from gateway.sim.profile import directive_overrides

_FRAME = (
    b'data: {"id":"chatcmpl-floor","object":"chat.completion.chunk","created":0,"model":"sim",'
    b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}]}\n\n'
)


def _timing(prompt: str) -> tuple[float, float, int]:
    """TTFT and inter-token gap in seconds, and the token count, from the
    prompt's directive as the simulator reads it (only these three knobs:
    a whole ``SimProfile`` per request would raise the floor it measures)."""
    knobs = directive_overrides(prompt)
    return (float(knobs.get("ttft_ms", 10)) / 1000, float(knobs.get("itl_ms", 5)) / 1000,
            int(knobs.get("tokens", 1)))


async def chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    ttft, itl, tokens = _timing(str(body["messages"][-1]["content"]))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b": ping\n\n")
    await asyncio.sleep(ttft)
    for index in range(tokens):
        if index:
            await asyncio.sleep(itl)
        await response.write(_FRAME)
    await response.write_eof(b"data: [DONE]\n\n")
    return response


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"floor-sse listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.perf.floor_sse")
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    try:
        import uvloop  # the gateway's loop when the fast extra is installed
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))
