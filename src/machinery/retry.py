"""Task retries as Go Machinery does them (docs/wire.md §7), as built-in middleware.

* ``retry_count=N``: a task that fails is run again up to N times, after Fibonacci delays
  (``fibonacci_next`` of the last delay: 1, 2, 3, 5, 8 ... seconds), with the same UUID;
* ``raise RetryTaskLater(reason, delay)``: run again after ``delay``, counters untouched.

Argument-conversion failures and results with no Go type are never retried (Go's rule for the
first; the second fails the same way every time).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from . import log
from ._backoff import persist
from .dispatch import Dispatcher
from .errors import ArgumentError, ResultTypeError, TaskRevoked
from .middleware import HookResult, Middleware, Outcome
from .signature import Signature
from .state import FAILURE, RETRY


def fibonacci_next(current: int) -> int:
    """The smallest of 1, 1, 2, 3, 5, 8, ... strictly greater than ``current`` (docs/wire.md §7.1)."""
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
        super().__init__(reason)
        self.reason = reason
        self.delay = timedelta(seconds=seconds)

    def __reduce__(self) -> tuple[type[RetryTaskLater], tuple[str, timedelta]]:
        # Raised in a pool process, it crosses back to the worker with its delay.
        return RetryTaskLater, (self.reason, self.delay)


#: Failures that would fail the same way on every run, and revocations.
NEVER_RETRIED: tuple[type[BaseException], ...] = (ArgumentError, ResultTypeError, TaskRevoked)


class Retries(Middleware):
    """Turns a failure with retries left into a RETRY, and sends the retry once it is stored."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def before_store(self, signature: Signature, outcome: Outcome) -> None:
        if outcome.state != FAILURE:
            return
        exc = outcome.exception
        if isinstance(exc, RetryTaskLater):
            delay = exc.delay.total_seconds()
        elif signature.retry_count > 0 and not isinstance(exc, NEVER_RETRIED):
            signature.retry_count -= 1
            signature.retry_timeout = fibonacci_next(signature.retry_timeout)
            delay = float(signature.retry_timeout)
        else:
            return
        outcome.state, outcome.retry_in, outcome.error = RETRY, delay, ""  # Go stores no error on RETRY

    def after_process(self, signature: Signature, outcome: Outcome) -> HookResult:
        if outcome.state != RETRY or outcome.retry_in is None:
            return None
        return self._send_retry(signature, outcome.retry_in, outcome.exception)

    async def _send_retry(self, signature: Signature, delay: float, exc: BaseException | None) -> None:
        signature.eta = datetime.now(timezone.utc) + timedelta(seconds=delay)
        reason = (str(exc) or type(exc).__name__) if exc is not None else ""
        log.logger.info("Task %s %s will retry in %g s: %s", signature.name, signature.uuid, delay, reason)
        # Same UUID, PENDING written again, published with the ETA (Go's SendTask).
        await persist(
            lambda: self._dispatcher.send(signature), f"sending the retry of {signature.name} {signature.uuid}"
        )
