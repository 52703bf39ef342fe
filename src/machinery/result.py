"""Handles on sent tasks: read their state, wait for their result."""

from __future__ import annotations

import contextlib
import time
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
        state = await self.backend.get_state(self.task_uuid)
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


class ChainAsyncResult:
    """The result of a sent chain: the last step's value.

    Every step's UUID is known when the chain is built, so ``get`` follows the chain step by
    step and raises ``TaskFailed`` for the first step that fails (the chain stops there)
    instead of waiting for a last step that will never run.
    """

    def __init__(self, task_uuids: list[str], backend: Backend) -> None:
        if not task_uuids:
            raise ValueError("a chain result needs at least one step")
        self.results = [AsyncResult(u, backend) for u in task_uuids]
        self.backend = backend

    @property
    def task_uuid(self) -> str:
        """The last step's UUID: the key of the chain's result."""
        return self.results[-1].task_uuid

    def __repr__(self) -> str:
        return f"<ChainAsyncResult {self.task_uuid} ({len(self.results)} steps)>"

    async def astate(self) -> TaskState:
        """The state of the chain as a whole: the failed step's, else the last step's."""
        for result in self.results[:-1]:
            state = await result.astate()
            if not state.is_success():
                return state
        return await self.results[-1].astate()

    def state(self) -> TaskState:
        return run_sync(self.astate())

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the last step and return its value.

        Raises ``TaskFailed`` naming the step that failed, and ``TimeoutError`` when
        ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        state = None
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            state = await self.backend.await_state(result.task_uuid, left)
            if state.is_failure():
                raise TaskFailed(result.task_uuid, state.error)
        assert state is not None
        return decode_results(state.results)

    def get(self, timeout: float | None = None) -> Any:
        return run_sync(self.aget(timeout))


class ChordAsyncResult:
    """The result of a sent chord: the callback's value.

    ``get`` watches the members as well as the callback, so a failed member raises
    ``TaskFailed`` naming it as soon as it is seen, not only after the rest have finished.
    """

    #: Seconds between looks at the members' states while waiting for the callback.
    member_poll_interval: float = 0.1

    def __init__(self, callback_uuid: str, group_uuid: str, task_uuids: list[str], backend: Backend) -> None:
        self.callback = AsyncResult(callback_uuid, backend)
        self.group_uuid = group_uuid
        self.results = [AsyncResult(u, backend) for u in task_uuids]
        self.backend = backend

    @property
    def task_uuid(self) -> str:
        """The callback's UUID: the key of the chord's result."""
        return self.callback.task_uuid

    def __repr__(self) -> str:
        return f"<ChordAsyncResult {self.task_uuid} ({len(self.results)} members)>"

    async def astate(self) -> TaskState:
        """The callback's state (PENDING until it has been sent)."""
        return await self.callback.astate()

    def state(self) -> TaskState:
        return run_sync(self.astate())

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the callback and return its value.

        Raises ``TaskFailed`` for the first failed member found (in group order) or for the
        callback itself, and ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        unfinished = [r.task_uuid for r in self.results]
        while True:
            state = await self.backend.get_state(self.task_uuid)
            if unfinished or (state is not None and state.is_failure()):
                # A failed member explains a failed callback better than the callback's own
                # error (the worker records "member ... failed" there without sending it).
                states = await self.backend.get_states(unfinished)
                for task_uuid, member in zip(unfinished, states, strict=True):
                    if member is not None and member.is_failure():
                        raise TaskFailed(task_uuid, member.error)
                unfinished = [u for u, m in zip(unfinished, states, strict=True) if m is None or not m.is_success()]
            if state is not None and state.is_completed():
                if state.is_failure():
                    raise TaskFailed(self.task_uuid, state.error)
                return decode_results(state.results)
            wait = self.member_poll_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chord {self.task_uuid} did not complete within {timeout} s")
                wait = min(wait, left)
            # Wakes at once when the callback completes; members are re-read after ``wait``.
            with contextlib.suppress(TimeoutError):
                await self.backend.await_state(self.task_uuid, wait)

    def get(self, timeout: float | None = None) -> Any:
        return run_sync(self.aget(timeout))
