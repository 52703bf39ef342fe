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

    async def close(self) -> None:
        """Release connections held by this lock."""

    async def close_loop_connections(self) -> None:
        """Close the connections bound to the running event loop; see ``Broker``'s."""


def now_ns() -> int:
    return time.time_ns()
