"""Waiting out an outage: Fibonacci reconnect delays, and running a write until it succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import log

T = TypeVar("T")

Reporter = Callable[[BaseException, str], None]
"""Called as ``report(exc, message)`` for each failed attempt, instead of logging it."""


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


async def persist(operation: Callable[[], Awaitable[T]], what: str, report: Reporter | None = None) -> T:
    """Run ``operation`` until it succeeds, backing off between attempts; return its result.

    For the writes that must not be lost once a task has run (its state, its retry, its
    callbacks): the broker or backend may come back, and the message stays held meanwhile.
    Only cancellation (an aborting worker) stops it.
    """
    backoff = Backoff()
    while True:
        try:
            return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff.next()
            message = f"{what} failed, retrying in {delay:.0f} s"
            if report is not None:
                report(exc, message)
            else:
                log.logger.warning("%s: %s: %s", message, type(exc).__name__, exc)
            await asyncio.sleep(delay)
