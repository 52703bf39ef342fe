"""An in-process lock (Go's eager lock): enough for one process, and the tests' reference."""

from __future__ import annotations

import threading
from typing import ClassVar

from .base import Lock, now_ns


class MemoryLock(Lock):
    _keys: ClassVar[dict[str, int]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        with self._guard:
            held = self._keys.get(key)
            if held is not None and held >= now_ns():
                return False
            self._keys[key] = deadline_ns
            return True
