"""Waiting out an outage: Fibonacci reconnect delays, and running a write until it succeeds."""

from __future__ import annotations

import asyncio
import time
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


#: Seconds between two reminders that something is still unreachable.
REMIND_EVERY = 60.0


class Outage:
    """Says once, clearly, that something cannot be reached and what is being done about it;
    reminds every ``REMIND_EVERY`` seconds while it lasts; says when it is over.

    ``report(exc, message)``, if given, is called for every failure instead (a worker's error
    handler): the application decides what to show.
    """

    def __init__(self, what: str, report: Reporter | None = None) -> None:
        self.what = what
        self._report = report
        self._since: float | None = None
        self._reminded = 0.0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, retry_in: float) -> None:
        now = time.monotonic()
        detail = f"{type(exc).__name__}: {exc}"
        if self._report is not None:
            self._report(exc, f"{self.what} failed, retrying in {retry_in:.0f} s")
        elif self._since is None:
            log.logger.error("%s failed (%s); retrying with a back-off (up to 10 s) until it works", self.what, detail)
        elif now - self._reminded >= REMIND_EVERY:
            elapsed = now - self._since
            log.logger.warning("%s still failing after %.0f s (%s); still retrying", self.what, elapsed, detail)
            self._reminded = now
        else:
            log.logger.debug("%s failed again, retrying in %.0f s: %s", self.what, retry_in, detail)
        if self._since is None:
            self._since = self._reminded = now

    def over(self) -> None:
        if self._since is not None:
            log.logger.info("%s works again, after %.0f s", self.what, time.monotonic() - self._since)
            self._since = None


async def persist(operation: Callable[[], Awaitable[T]], what: str, report: Reporter | None = None) -> T:
    """Run ``operation`` until it succeeds, backing off between attempts; return its result.

    For the writes that must not be lost once a task has run (its state, its retry, its
    callbacks): the broker or backend may come back, and the message stays held meanwhile.
    Only cancellation (an aborting worker) stops it. The outage is reported once (``Outage``).
    """
    retrying: tuple[Backoff, Outage] | None = None  # made on the first failure: most writes never fail
    while True:
        try:
            result = await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if retrying is None:
                retrying = Backoff(), Outage(what, report)
            backoff, outage = retrying
            delay = backoff.next()
            outage.failed(exc, delay)
            await asyncio.sleep(delay)
        else:
            if retrying is not None:
                retrying[1].over()
            return result
