"""The threads ``def`` tasks run on, counted: an abort cannot stop a thread, so it must know."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TaskThreads(ThreadPoolExecutor):
    """The threads of ``def`` tasks, counting the calls still running."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def busy(self) -> int:
        """How many task calls are running on a thread now."""
        with self._count_lock:
            return self._running

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            with self._count_lock:
                self._running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self._running -= 1

        return super().submit(counted)
