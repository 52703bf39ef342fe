"""The lock seam, with Go Machinery's semantics (docs/wire.md §12).

A lock is a key holding a deadline in Unix nanoseconds. Whoever stores it first wins; the
key can be taken again once that deadline has passed, and it expires by itself then.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from ..config import Config


class Lock(ABC):
    """Acquire a named lock until a deadline; used so that each periodic tick fires once."""

    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url

    @abstractmethod
    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        """Take ``key`` until ``deadline_ns`` (Unix ns) unless someone holds it; True if taken."""

    async def lock(self, key: str, deadline_ns: int, retries: int = 3) -> bool:
        """``try_lock`` up to ``retries`` times, as Go's ``LockWithRetries``."""
        for _ in range(max(1, retries)):
            if await self.try_lock(key, deadline_ns):
                return True
        return False

    # ------------------------------------------------------------------ task controls

    @abstractmethod
    async def claim(self, key: str, value: str, seconds: float) -> str | None:
        """Hold ``key`` with ``value`` for ``seconds`` unless someone holds it: None if taken
        now, else the holder's value (a unique task: the UUID of the equal task already sent)."""

    @abstractmethod
    async def release(self, key: str, value: str) -> bool:
        """Let go of ``key`` if it still holds ``value``; True if it did."""

    @abstractmethod
    async def take_turn(self, key: str, interval: float, burst: int) -> float:
        """Book a run under a rate limit: the seconds until its turn (0.0: now).

        At most one run per ``interval`` seconds on average across everyone sharing the lock,
        with up to ``burst`` at once (the generic cell rate algorithm: one stored time per
        key). The turn is booked: the caller runs when it comes, and asks for no other.
        """

    async def close(self) -> None:
        """Release connections held by this lock."""

    async def close_loop_connections(self) -> None:
        """Close the connections bound to the running event loop; see ``Broker``'s."""


def now_ns() -> int:
    return time.time_ns()


def next_turn(stored: float | None, now: float, interval: float, burst: int) -> tuple[float, float]:
    """One booking by the generic cell rate algorithm, as every lock stores it.

    ``stored`` is the key's theoretical arrival time (Unix seconds) or None. Returns (seconds
    until the booked turn, the arrival time to store).
    """
    arrival = max(stored or now, now)
    return max(0.0, arrival - (burst - 1) * interval - now), arrival + interval
