"""Writing a task's progress beside its state, without slowing the task down."""

from __future__ import annotations

import asyncio
import threading

from .. import log
from ..backends.base import Backend
from ..errors import UnsupportedOperation
from ..state import PROGRESS, encode_progress


class ProgressWriter:
    """``writer(fraction, message)``, from the task's loop, thread or process: keeps the latest
    report and writes it in the background, one write at a time (reports made meanwhile are
    folded into the next write)."""

    def __init__(self, backend: Backend, task_uuid: str) -> None:
        self._backend = backend
        self._task_uuid = task_uuid
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._latest: tuple[float, str] | None = None
        self._writing: asyncio.Future[None] | None = None

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            self._latest = (fraction, message)
        self._loop.call_soon_threadsafe(self._start)  # (also from the loop's own thread)

    def _start(self) -> None:
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while True:
            with self._lock:
                latest, self._latest = self._latest, None
            if latest is None:
                return
            try:
                await self._backend.write_annotation(self._task_uuid, PROGRESS, encode_progress(*latest))
            except UnsupportedOperation:
                return  # this backend keeps nothing beside states
            except Exception as exc:  # a lost progress report is not worth failing the task
                log.logger.debug("Writing the progress of %s failed: %s", self._task_uuid, exc)

    async def flushed(self) -> None:
        """Wait for the last report to be written (before the task's final state is)."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
