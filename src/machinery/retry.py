"""Retry rules: Go Machinery's Fibonacci task backoff, RetryTaskLater, and reconnect backoff."""

from __future__ import annotations

from datetime import timedelta


def fibonacci_next(current: int) -> int:
    """The smallest of 1, 1, 2, 3, 5, 8, ... strictly greater than ``current`` (WIRE.md 7.1)."""
    a, b = 1, 1
    while a <= current:
        a, b = b, a + b
    return a


class RetryTaskLater(Exception):
    """Raise from a task to run it again after ``delay``, leaving its retry counters alone."""

    def __init__(self, reason: str = "", delay: timedelta | float = 0.0) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if seconds < 0:
            raise ValueError(f"RetryTaskLater delay must not be negative, got {seconds} s")
        super().__init__(f"Task error: {reason} Will retry in: {seconds}s")
        self.reason = reason
        self.delay = timedelta(seconds=seconds)


class Backoff:
    """Delays between reconnect attempts: Fibonacci seconds like Go's broker retry, capped."""

    def __init__(self, cap: float = 10.0, unit: float = 1.0) -> None:
        self._cap = cap
        self._unit = unit
        self.reset()

    def reset(self) -> None:
        self._a, self._b = 0, 1

    def next(self) -> float:
        delay = min(self._cap, self._a * self._unit)
        self._a, self._b = self._b, self._a + self._b
        return delay
