"""Progress while the suite runs: a line per phase with a counter, on a terminal only.

On a terminal the counter rewrites its line with ``\\r``; in CI (``CI`` set to
a true value) or when stdout is not a terminal nothing is printed at all, so
logs hold the report and nothing else, and the go/no-go lines stay last.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def interactive(stream: TextIO) -> bool:
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return not in_ci and stream.isatty()


class Progress:
    """``start(phase, total)``, ``advance()`` per finished request, ``finish()``."""

    #: Redraws at most this often: a counter is for eyes, not for the loop.
    _REDRAW_S = 0.1

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._enabled = interactive(self._stream) if enabled is None else enabled
        self._phase = ""
        self._total = 0
        self._done = 0
        self._drawn_at = 0.0

    def start(self, phase: str, total: int) -> None:
        self._phase, self._total, self._done = phase, total, 0
        self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self._done += count
        self._draw(force=self._done >= self._total)

    def finish(self, note: str = "") -> None:
        if self._enabled:
            self._stream.write(f"\r{self._line()}{'  ' + note if note else ''}\n")
            self._stream.flush()

    def _line(self) -> str:
        return f"{self._phase:<28} {self._done:>5}/{self._total}"

    def _draw(self, *, force: bool) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if force or now - self._drawn_at >= self._REDRAW_S:
            self._drawn_at = now
            self._stream.write("\r" + self._line())
            self._stream.flush()
