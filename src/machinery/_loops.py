"""Living with several event loops: values kept per loop, and wake-ups across loops.

machinery runs on several loops at once (a worker's, the sync face's background loop, an
application's). asyncio connections, locks and queues belong to the loop that made them, so
a driver keeps one client per loop (``PerLoop``) rather than one per process; a loop that is
garbage-collected takes its value with it. A task's completion may be seen on one loop and
awaited on another (``Waiters``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One ``T`` per running event loop, made by ``factory()`` on first use in that loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> T:
        """The running loop's value, made now if it has none."""
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            with self._lock:  # two threads may meet here only through one loop's first use
                value = self._values.get(loop)
                if value is None:
                    value = self._values[loop] = self._factory()
        return value

    def peek(self) -> T | None:
        """The running loop's value if it has one; never makes one."""
        return self._values.get(asyncio.get_running_loop())

    def pop(self) -> T | None:
        """Forget the running loop's value and return it (for the caller to close)."""
        with self._lock:
            return self._values.pop(asyncio.get_running_loop(), None)


class Waiters:
    """Wakes local coroutines (on any loop, in any thread) waiting for a task's completion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Waiter]] = {}

    def watch(self, task_uuid: str) -> _Watch:
        return _Watch(self, task_uuid)

    def notify(self, task_uuid: str, state: bytes | None = None) -> None:
        """Wake the waiters of ``task_uuid``, handing them the completed ``state`` if known."""
        with self._lock:
            targets = list(self._waiting.get(task_uuid, ()))
        for waiter in targets:
            waiter.state = state
            with contextlib.suppress(RuntimeError):  # that loop has closed
                waiter.loop.call_soon_threadsafe(waiter.event.set)

    def _add(self, task_uuid: str, waiter: Waiter) -> None:
        with self._lock:
            self._waiting.setdefault(task_uuid, []).append(waiter)

    def _remove(self, task_uuid: str, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiting.get(task_uuid, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(task_uuid, None)


@dataclass(eq=False)
class Waiter:
    """One coroutine waiting for a completion, on its own loop."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)
    state: bytes | None = None


class _Watch:
    def __init__(self, waiters: Waiters, task_uuid: str) -> None:
        self._waiters = waiters
        self._uuid = task_uuid
        self._waiter: Waiter | None = None

    async def __aenter__(self) -> Waiter:
        self._waiter = Waiter(asyncio.get_running_loop())
        self._waiters._add(self._uuid, self._waiter)
        return self._waiter

    async def __aexit__(self, *exc: object) -> None:
        assert self._waiter is not None
        self._waiters._remove(self._uuid, self._waiter)
