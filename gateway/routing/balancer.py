"""Choosing among upstreams of equal priority: weighted least in-flight.

The score of an upstream is ``(in_flight + 1) / weight``: the one whose next
request would leave it least loaded for its weight wins; ties go round-robin,
so a quiet gateway still spreads its requests. With the handful of upstreams
a gateway has, looking at all of them is cheaper than sampling; the in-flight
counts are this process's own, exact and up to date in the tick a request is
placed, so a burst spreads at once (power-of-two-choices exists for large or
stale views; docs/routing.md has the comparison we measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Weighted(Protocol):
    @property
    def weight(self) -> float: ...

    @property
    def in_flight(self) -> int: ...


W = TypeVar("W", bound=Weighted)


class LeastInFlight:
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = 0

    def order(self, group: Sequence[W]) -> list[W]:
        """``group`` best first: by score, ties starting at a rotating place."""
        if len(group) <= 1:
            return list(group)
        self._turn += 1
        start = self._turn % len(group)
        rotated = list(group[start:]) + list(group[:start])
        return sorted(rotated, key=lambda up: (up.in_flight + 1) / up.weight)
