"""Writes made during one event-loop tick, stored together in one SQLite transaction.

A worker running many tasks at once writes many small things at nearly the same moment (each
task's STARTED, its final state, its ack). One transaction each costs one commit each; taken
together at the end of the tick they cost one, and every caller still returns only after the
commit that holds its write, so nothing is acknowledged that is not stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - one caller's item
R = TypeVar("R")  # what that caller gets back


class TickBatcher(Generic[I, R]):
    """Collects the items of one loop tick and hands them to ``submit`` as one list.

    ``submit(items)`` queues one job on the database thread and returns its future, whose
    result has one entry per item, in order. Each event loop has its own batch (the sync face
    runs a loop per calling thread), and each loop touches only its own.
    """

    def __init__(self, submit: Callable[[list[I]], concurrent.futures.Future[list[R]]]) -> None:
        self._submit = submit
        self._batches: dict[asyncio.AbstractEventLoop, list[tuple[I, asyncio.Future[R]]]] = {}

    async def add(self, item: I) -> R:
        """Store ``item`` with the rest of this tick's; return its result once committed."""
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = []
            loop.call_soon(self._flush, loop)
        future: asyncio.Future[R] = loop.create_future()
        batch.append((item, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._batches.pop(loop)
        try:
            done = self._submit([item for item, _ in batch])
        except BaseException as exc:  # e.g. the store is closed: every caller gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return

        def settle(result: concurrent.futures.Future[list[R]]) -> None:
            error = result.exception()
            values = None if error is not None else result.result()
            for index, (_, future) in enumerate(batch):
                if future.done():  # its caller was cancelled; the write happened all the same
                    continue
                if values is None:
                    assert error is not None
                    future.set_exception(error)
                else:
                    future.set_result(values[index])

        def settle_in_loop(result: concurrent.futures.Future[list[R]]) -> None:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits any more
                loop.call_soon_threadsafe(settle, result)

        done.add_done_callback(settle_in_loop)
