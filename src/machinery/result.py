"""Handles on sent tasks: read their state, wait for their result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sync import run_sync
from .errors import TaskFailed
from .state import PENDING, TaskState
from .types import decode_results

if TYPE_CHECKING:
    from .backends.base import Backend


class AsyncResult:
    """The result of one sent task.

    ``get`` waits without busy polling: the backend wakes it when the final state is written.
    """

    def __init__(self, task_uuid: str, backend: Backend) -> None:
        self.task_uuid = task_uuid
        self.backend = backend

    def __repr__(self) -> str:
        return f"<AsyncResult {self.task_uuid}>"

    async def astate(self) -> TaskState:
        """The task's current state (PENDING if the backend has none yet)."""
        state = await self.backend.aget_state(self.task_uuid)
        return state if state is not None else TaskState(self.task_uuid, PENDING)

    def state(self) -> TaskState:
        return run_sync(self.astate())

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the task and return what it returned (a tuple for several values).

        Raises ``TaskFailed`` with the stored error on FAILURE and ``TimeoutError`` when
        ``timeout`` seconds pass first.
        """
        state = await self.backend.await_state(self.task_uuid, timeout)
        if state.is_failure():
            raise TaskFailed(self.task_uuid, state.error)
        return decode_results(state.results)

    def get(self, timeout: float | None = None) -> Any:
        return run_sync(self.aget(timeout))
