"""Waiting for something to happen, with a generous deadline that is never an expectation of speed.

A test waits for an event or a count (``wait_until``, ``await_until``), never sleeps and then
counts, and never asserts how long anything took: a loaded machine makes everything slower,
and the deadline only turns a hang into a failure that says what did not happen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Upper bound for anything to happen in a test; generous on purpose.
WAIT = 30.0
#: How often a predicate is looked at again.
POLL = 0.02


def wait_until(predicate: Callable[[], T], timeout: float = WAIT, what: str = "condition") -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` if that has not happened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(POLL)


async def await_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = WAIT, what: str = "condition") -> T:
    """``wait_until`` for a running event loop: ``predicate`` may be a plain or async function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(POLL)
