"""The threads ``def`` tasks run on, counted (an abort cannot stop a thread, so it must know),
and handing their results back to the loop in batches."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_Finished = tuple["asyncio.Future[Any]", "Future[Any]"]


class TaskThreads(ThreadPoolExecutor):
    """The threads of ``def`` tasks, counting the calls still running."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._running = 0
        self._lock = threading.Lock()
        # Calls finished on a thread, by the loop waiting for them, not yet handed to it. A loop
        # with an entry here has a hand-over scheduled already.
        self._finished: dict[asyncio.AbstractEventLoop, list[_Finished]] = {}

    @property
    def busy(self) -> int:
        """How many task calls are running on a thread now."""
        with self._lock:
            return self._running

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            with self._lock:
                self._running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._running -= 1

        return super().submit(counted)

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` on a thread, as a future of the running loop (``loop.run_in_executor``, but
        calls that finish while the loop is busy are handed back together: one wake-up of the
        loop for all of them, so their outcomes are written in one batch too). Cancelling the
        future cancels the call if it has not started."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        call = self.submit(fn)
        waiter.add_done_callback(lambda _: call.cancel() if waiter.cancelled() else None)
        call.add_done_callback(functools.partial(self._call_finished, loop, waiter))
        return waiter

    def _call_finished(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], call: Future[Any]) -> None:
        """On the thread that ran (or cancelled) the call: queue it for the loop, and wake the
        loop unless a wake-up is on its way already."""
        with self._lock:
            batch = self._finished.get(loop)
            if batch is not None:
                batch.append((waiter, call))
                return
            self._finished[loop] = [(waiter, call)]
        try:
            loop.call_soon_threadsafe(self._hand_over, loop)
        except RuntimeError:  # the loop is closed: nobody waits for these any more
            with self._lock:
                self._finished.pop(loop, None)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._finished.pop(loop, [])
        for waiter, call in batch:
            if waiter.done():
                continue
            if call.cancelled():
                waiter.cancel()
            elif (error := call.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(call.result())
