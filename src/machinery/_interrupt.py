"""Throwing an exception of our choosing into a running coroutine, at the ``await`` it waits on.

asyncio can only cancel a task, which raises ``CancelledError`` where it waits. To deliver
``SoftTimeLimitExceeded`` instead, ``Interruptible`` drives the coroutine itself (as ``await``
does) and, when interrupted, cancels the task it runs in and throws the chosen exception into
the coroutine in place of the cancellation. The coroutine sees that exception at its current
``await`` and may catch it; the task is not left cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Interruptible(Generic[T]):
    """``await Interruptible(coro)`` runs ``coro``; ``interrupt(exc)`` raises ``exc`` inside it."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._task: asyncio.Task[Any] | None = None
        self._pending: BaseException | None = None

    def interrupt(self, exc: BaseException) -> bool:
        """Raise ``exc`` in the coroutine where it waits now (call from its loop's thread).

        Returns False if it is not running (not started yet, or finished).
        """
        task = self._task
        if task is None or task.done():
            return False
        self._pending = exc
        task.cancel()
        return True

    def __await__(self) -> Generator[Any, Any, T]:
        self._task = asyncio.current_task()
        coro = self._coro
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            try:
                yielded = coro.throw(to_throw) if to_throw is not None else coro.send(to_send)
            except StopIteration as stop:
                result: T = stop.value
                return result
            to_send, to_throw = None, None
            try:
                to_send = yield yielded
            except asyncio.CancelledError as cancelled:
                if self._pending is None:
                    to_throw = cancelled
                else:
                    to_throw, self._pending = self._pending, None
                    uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
                    if uncancel is not None:
                        uncancel()
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                to_throw = exc
