"""A passive circuit breaker per upstream: sans-IO, the clock passed in.

Closed: requests flow; ``failures`` consecutive failures open it. Open:
the upstream is skipped until the cooldown has passed (or, after a 429, until
its Retry-After, whichever is later). Then half-open: exactly one request
(the probe) may go; its success closes the circuit, its failure opens it for
another cooldown. Only failures that say something about the upstream count
(connect, timeout, 5xx, 429, a lost connection): a client's 400 does not.
"""

from __future__ import annotations

import enum


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    __slots__ = (
        "failures", "cooldown_s", "_consecutive", "_state", "_open_until", "_probing", "_openings"
    )

    def __init__(self, *, failures: int, cooldown_s: float) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._consecutive = 0
        self._state = CircuitState.CLOSED
        self._open_until = 0.0
        #: Whether the one half-open probe is out.
        self._probing = False
        #: How many times the circuit opened: names the half-open a probe
        #: was taken in (``release``).
        self._openings = 0

    def state(self, now: float) -> CircuitState:
        if self._state is CircuitState.OPEN and now >= self._open_until:
            self._state = CircuitState.HALF_OPEN
            self._probing = False
        return self._state

    @property
    def open_until(self) -> float:
        """When an open circuit half-opens (meaningless while closed)."""
        return self._open_until

    @property
    def openings(self) -> int:
        """How many times the circuit opened; a probe taken now is this
        half-open's, for ``release``."""
        return self._openings

    def available(self, now: float) -> bool:
        """Whether a request may go now (without taking the probe)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        return state is CircuitState.HALF_OPEN and not self._probing

    def acquire(self, now: float) -> bool:
        """Take the right to send one request; in half-open, the probe."""
        if not self.available(now):
            return False
        if self._state is CircuitState.HALF_OPEN:
            self._probing = True
        return True

    def success(self) -> None:
        self._consecutive = 0
        self._state = CircuitState.CLOSED
        self._probing = False

    def failure(self, now: float, *, hold_until: float | None = None) -> None:
        """One failure; ``hold_until`` (a 429's Retry-After) keeps the
        upstream skipped at least that long, whatever the count."""
        self._consecutive += 1
        until: float | None = None
        if self.state(now) is CircuitState.HALF_OPEN or self._consecutive >= self.failures:
            until = now + self.cooldown_s
        if hold_until is not None and hold_until > now:
            until = hold_until if until is None else max(until, hold_until)
        if until is not None:
            self._open(until)

    def release(self, opening: int) -> None:
        """A request that took the probe of the half-open after ``opening``
        (``openings`` then) ended without telling anything (cancelled by its
        client): another may probe. A probe of an earlier half-open is not
        the one out: the circuit opened again since, and its new probe may
        be out with another request."""
        if self._state is CircuitState.HALF_OPEN and opening == self._openings:
            self._probing = False

    def _open(self, until: float) -> None:
        self._openings += 1
        self._state = CircuitState.OPEN
        self._open_until = until
        self._probing = False
