"""The retry budget: retries allowed per window, in proportion to requests.

Finagle's RetryBudget and Envoy's retry budget in one small sans-IO class: over
the last ``window_s`` seconds, at most ``minimum + ratio * requests`` retries.
When every upstream fails, retries cannot multiply the load by the attempt
count: past the budget, a request fails with what its last attempt got.
Counted in one-second buckets (a ring), so memory is constant.
"""

from __future__ import annotations

import math


class RetryBudget:
    __slots__ = ("ratio", "minimum", "_buckets", "_requests", "_retries", "_epoch")

    def __init__(self, *, ratio: float, minimum: int, window_s: int = 10) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self._buckets = window_s
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self._epoch = -1  # the whole second of the newest bucket

    def request(self, now: float) -> None:
        """A first attempt (deposits ``ratio`` of a retry)."""
        self._requests[self._slot(now)] += 1

    def try_retry(self, now: float) -> bool:
        """Withdraw one retry if the window allows it."""
        slot = self._slot(now)
        allowed = self.minimum + self.ratio * sum(self._requests)
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def _slot(self, now: float) -> int:
        second = math.floor(now)
        if second != self._epoch:
            # Clear the buckets of the seconds that passed since the last call.
            for passed in range(self._epoch + 1, second + 1)[-self._buckets:]:
                index = passed % self._buckets
                self._requests[index] = 0
                self._retries[index] = 0
            self._epoch = second
        return second % self._buckets
