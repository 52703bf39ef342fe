"""An in-process lock (Go's eager lock): enough for one process, and the tests' reference."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from .base import Lock, next_turn, now_ns


class MemoryLock(Lock):
    _keys: ClassVar[dict[str, int]] = {}
    _claims: ClassVar[dict[str, tuple[float, str]]] = {}  # key -> (expiry, value)
    _turns: ClassVar[dict[str, float]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        with self._guard:
            held = self._keys.get(key)
            if held is not None and held >= now_ns():
                return False
            self._keys[key] = deadline_ns
            return True

    async def claim(self, key: str, value: str, seconds: float) -> str | None:
        with self._guard:
            held = self._claims.get(key)
            if held is not None and held[0] > time.monotonic():
                return held[1]
            self._claims[key] = (time.monotonic() + seconds, value)
            return None

    async def release(self, key: str, value: str) -> bool:
        with self._guard:
            held = self._claims.get(key)
            if held is None or held[1] != value:
                return False
            del self._claims[key]
            return True

    async def take_turn(self, key: str, interval: float, burst: int) -> float:
        with self._guard:
            wait, self._turns[key] = next_turn(self._turns.get(key), time.time(), interval, burst)
            return wait
