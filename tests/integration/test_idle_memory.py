"""What an idle open stream costs in the gateway's own objects.

The memory target (<= 20 KiB of RSS per idle stream, ``make bench``) is
missed by ~1.6 KiB (tests/perf/PROFILES.md, "what an idle stream holds
now"); about half of the figure is aiohttp's and uvloop's, so a regression
in ours is what would push it further. tracemalloc counts the bytes still held that were
allocated with a frame of the gateway's or the actors' code innermost: the
coroutines, the per-stream objects, the tables they grow.

A line tracer (coverage, a debugger) is set aside while the streams open:
tracing makes CPython build a frame object for every coroutine it enters
(+1,280 bytes a stream under coverage 7.18), which is the tracer's cost, not
the gateway's, and would fail the budget of a run under coverage.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

import actors
from tests.integration.sse_frames import FrameReader

STREAMS = 100
WARM = 10
#: 6,047 bytes per stream in-process on CPython 3.11 (asyncio's loop, not
#: uvloop): the routed source, a read coroutine safe to cancel and the
#: reader's lag bound cost ~750 bytes more than a bare future did. ~4 % of
#: slack.
MAX_OWN_BYTES_PER_STREAM = 6_300


def _chat(prompt: str) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}


# As the code objects name their files: the same path the packages came from.
_ROOT = Path(actors.__file__).parent.parent
_OURS = (f"{_ROOT / 'gateway'}{os.sep}", f"{_ROOT / 'actors'}{os.sep}")
_SIMULATOR = f"{_ROOT / 'gateway' / 'sim'}{os.sep}"


@contextmanager
def _untraced() -> Iterator[None]:
    """No line tracer for the frames started inside (sys.settrace is the
    documented way to take one off and put it back; coverage's tracer takes
    being put back this way)."""
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        yield
    finally:
        sys.settrace(tracer)


def _ours(filename: str) -> bool:
    return filename.startswith(_OURS) and not filename.startswith(_SIMULATOR)


async def test_an_idle_stream_holds_few_of_the_gateways_own_bytes(gateway):
    url = gateway.v1 + "/chat/completions"
    # One connection a stream, more than aiohttp's default pool of 100.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def open_streams(first: int, count: int) -> list[aiohttp.ClientResponse]:
            """Streams parked mid-answer: the first token came at once, the
            next one is a minute away."""
            responses = []
            for i in range(first, first + count):
                prompt = f"idle {i} [sim ttft_ms=0 itl_ms=60000 tokens=2]"
                resp = await http.post(url, json=_chat(prompt))
                reader = FrameReader(resp)
                while (frame := await reader.next()) is not None and not (
                    frame.data and frame.json().get("choices")
                ):
                    pass
                # The first token reached the client: the actor appended it
                # and went back to its read, and the handler wrote it and
                # parked, each in the same step, so both wait now.
                assert frame is not None
                responses.append(resp)
            return responses

        # Pools, caches and the first growth of every table, out of the count.
        warm = await open_streams(0, WARM)
        gc.collect()
        with _untraced():
            tracemalloc.start(1)
            try:
                idle = await open_streams(WARM, STREAMS)
                gc.collect()
                snapshot = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
        for resp in warm + idle:
            resp.close()
    own = sum(stat.size for stat in snapshot.statistics("filename") if _ours(stat.traceback[0].filename))
    # The floor: the filter found the gateway's files at all.
    assert 2_000 <= own / STREAMS <= MAX_OWN_BYTES_PER_STREAM, f"{own / STREAMS:,.0f} bytes a stream"
