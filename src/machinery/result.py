"""Handles on sent tasks: read their state, wait for their result."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from ._sync import run_sync
from .errors import TaskFailed, TaskNotFoundError, UnsupportedOperation
from .state import FAILURE, PENDING, PROGRESS, TRACEBACK, TaskState, parse_progress
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

    async def astate(self) -> TaskState | None:
        """The task's stored state, or None if there is none: the UUID was never sent to this
        backend, or its result expired (a sent task is PENDING from before it is published)."""
        return await self.backend.get_state(self.task_uuid)

    def state(self) -> TaskState | None:
        return run_sync(self.astate(), here=self.backend.idle_loop_ok)

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the task and return what it returned (a tuple for several values).

        Raises ``TaskFailed`` with the stored error on FAILURE, ``TimeoutError`` when
        ``timeout`` seconds pass first, and ``TaskNotFoundError`` when no state at all has
        appeared within the config's ``unknown_task_grace`` (default 10 s).
        """
        grace = self.backend.config.unknown_task_grace
        state = await self.backend.await_state(self.task_uuid, timeout, grace)
        if state.is_failure():
            raise TaskFailed(self.task_uuid, state.error)
        return decode_results(state.results)

    def get(self, timeout: float | None = None) -> Any:
        return run_sync(self.aget(timeout), here=self.backend.idle_loop_ok)

    async def aprogress(self) -> tuple[float, str] | None:
        """The latest ``ctx.progress(fraction, message)`` the task reported, or None."""
        try:
            return parse_progress(await self.backend.get_annotation(self.task_uuid, PROGRESS))
        except UnsupportedOperation:
            return None

    def progress(self) -> tuple[float, str] | None:
        return run_sync(self.aprogress(), here=self.backend.idle_loop_ok)

    async def atraceback(self) -> str | None:
        """The traceback of the task's failure (stored beside its state, so that Go's ``Error``
        stays the message), or None."""
        try:
            return await self.backend.get_annotation(self.task_uuid, TRACEBACK)
        except UnsupportedOperation:
            return None

    def traceback(self) -> str | None:
        return run_sync(self.atraceback(), here=self.backend.idle_loop_ok)

    async def arevoke(self, terminate: bool = False) -> None:
        """Revoke the task: a worker that takes it skips it; with ``terminate``, a worker that
        runs it stops it (an ``async def`` task is cancelled, a pool process killed; a ``def``
        task on a thread runs on, but its outcome is a FAILURE). Every worker learns it within
        a second, and it expires with the results. A task not taken yet is FAILURE "revoked"
        at once, so that waiters, Go's included, stop waiting."""
        await self.backend.revoke(self.task_uuid, terminate)
        state = await self.backend.get_state(self.task_uuid)
        if state is None or state.state == PENDING:
            name = state.task_name if state is not None else ""
            await self.backend.write_states([TaskState(self.task_uuid, FAILURE, name, error="revoked")], True)

    def revoke(self, terminate: bool = False) -> None:
        run_sync(self.arevoke(terminate), here=self.backend.idle_loop_ok)


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

    async def astate(self) -> TaskState | None:
        """The state of the chain as a whole: the failed or unfinished step's, else the last
        step's; a step not sent yet (its predecessor is still running) counts as PENDING.
        None if the chain's first step has no state (never sent here, or expired)."""
        for index, result in enumerate(self.results):
            state = await result.astate()
            if state is None:
                return None if index == 0 else TaskState(result.task_uuid, PENDING)
            if not state.is_success() or index == len(self.results) - 1:
                return state
        raise AssertionError("a chain has at least one step")

    def state(self) -> TaskState | None:
        return run_sync(self.astate(), here=self.backend.idle_loop_ok)

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the last step and return its value.

        Raises ``TaskFailed`` naming the step that failed, and ``TimeoutError`` when
        ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        state = None
        for index, result in enumerate(self.results):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Only the first step must exist already; each later one is sent when its
            # predecessor succeeds, however long that takes.
            grace = self.backend.config.unknown_task_grace if index == 0 else None
            state = await self.backend.await_state(result.task_uuid, left, grace)
            if state.is_failure():
                raise TaskFailed(result.task_uuid, state.error)
        assert state is not None
        return decode_results(state.results)

    def get(self, timeout: float | None = None) -> Any:
        return run_sync(self.aget(timeout), here=self.backend.idle_loop_ok)


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
        """The callback's state; PENDING until it has been sent (the group is still running)."""
        state = await self.callback.astate()
        return state if state is not None else TaskState(self.task_uuid, PENDING)

    def state(self) -> TaskState:
        return run_sync(self.astate(), here=self.backend.idle_loop_ok)

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the callback and return its value.

        Raises ``TaskFailed`` for the first failed member found (in group order) or for the
        callback itself, and ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        grace = self.backend.config.unknown_task_grace
        unfinished = [r.task_uuid for r in self.results]
        seen_any = False
        while True:
            state = await self.backend.get_state(self.task_uuid)
            if unfinished or (state is not None and state.is_failure()):
                # A failed member explains a failed callback better than the callback's own
                # error (the worker records "member ... failed" there without sending it).
                states = await self.backend.get_states(unfinished)
                for task_uuid, member in zip(unfinished, states, strict=True):
                    if member is not None and member.is_failure():
                        raise TaskFailed(task_uuid, member.error)
                seen_any = seen_any or state is not None or any(m is not None for m in states)
                if not seen_any and time.monotonic() - started >= grace:
                    raise TaskNotFoundError(
                        self.task_uuid,
                        f"no state for any member of chord {self.group_uuid}: it was never sent to this "
                        f"backend, or its results expired",
                    )
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
        return run_sync(self.aget(timeout), here=self.backend.idle_loop_ok)
