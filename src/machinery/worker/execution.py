"""Running task functions within their time limits, and stopping one on request.

* ``async def`` tasks run on the worker's loop. A soft limit raises ``SoftTimeLimitExceeded``
  at the ``await`` the task waits on (``Interruptible``); the hard limit cancels it.
* ``def`` tasks run on the worker's threads, or with ``pool="processes"`` in child processes
  (``pool.ProcessPool``). In a child, the soft limit is delivered as ``SoftTimeLimitExceeded``
  (a signal) and the hard limit kills the child. On a thread neither can be delivered (Python
  cannot interrupt a thread): at the hard limit the worker stops waiting, records the
  failure, and the thread runs on to its end.

Stopping a run (a hard limit, ``revoke(..., terminate=True)``) cancels the asyncio task that
waits for it, with the reason remembered: the wait ends with that reason as the task's error.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._interrupt import Interruptible
from ..controls import Limits
from ..errors import SoftTimeLimitExceeded, TimeLimitExceeded
from ..registry import ProgressReport, TaskContext, TaskSpec
from ..signature import Signature
from .pool import ProcessPool
from .threads import TaskThreads
from .tracebacks import carry, coroutine_frames, thread_frames, where_it_waits


@dataclass(eq=False)
class _Run:
    """One running call: the asyncio task waiting for it, where the task's code runs (its
    coroutine or its thread, to say where it was if it is stopped), and why it was stopped."""

    waiter: asyncio.Task[Any] | None
    reason: BaseException | None = None
    stoppable: bool = True
    coroutine: Any = None
    thread_id: int | None = None

    def stop(self, reason: BaseException) -> bool:
        if not self.stoppable or self.waiter is None or self.reason is not None:
            return False
        frames = coroutine_frames(self.coroutine) if self.coroutine is not None else []
        if self.thread_id is not None:
            frames = thread_frames(self.thread_id)
        text = where_it_waits(frames, reason)
        if text is not None:
            carry(reason, text)
        self.reason = reason
        self.waiter.cancel()
        return True

    def on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` on this thread, remembering the thread while it runs."""
        self.thread_id = threading.get_ident()
        try:
            return fn(*args)
        finally:
            self.thread_id = None


class Execution:
    """How one worker runs task functions: ``async def`` on its loop, ``def`` on its threads or
    in its process pool, each within its limits."""

    def __init__(self, threads: TaskThreads, pool: ProcessPool | None) -> None:
        self.threads = threads
        self.pool = pool
        self._runs: dict[str, list[_Run]] = {}

    async def run(
        self, spec: TaskSpec, signature: Signature, values: list[Any], limits: Limits, report: ProgressReport | None
    ) -> Any:
        """Call the task's function and return what it returned; raises what it raised, or
        ``TimeLimitExceeded``, or the reason given to ``stop``."""
        run = _Run(asyncio.current_task())
        runs = self._runs.get(signature.uuid)
        if runs is None:
            self._runs[signature.uuid] = [run]
        else:  # the same task twice at once here (a redelivery while it still runs)
            runs.append(run)
        hard = None
        if limits.hard is not None:
            hard = asyncio.get_running_loop().call_later(
                limits.hard, run.stop, self._hard_limit_error(spec, limits.hard)
            )
        try:
            return await self._call(spec, signature, values, limits, report, run)
        except asyncio.CancelledError:
            if run.reason is None:
                raise  # the worker itself is being cancelled (an abort)
            uncancel = getattr(run.waiter, "uncancel", None)  # Python 3.11+: this cancel is handled
            if uncancel is not None:
                uncancel()
            raise run.reason from None
        finally:
            run.stoppable = False
            if hard is not None:
                hard.cancel()
            runs = self._runs.get(signature.uuid, [])
            runs.remove(run)
            if not runs:
                self._runs.pop(signature.uuid, None)

    def stop(self, task_uuid: str, reason: BaseException) -> bool:
        """Stop every running call of ``task_uuid`` with ``reason``; False if none was running."""
        return any([run.stop(reason) for run in self._runs.get(task_uuid, [])])

    def _hard_limit_error(self, spec: TaskSpec, seconds: float) -> TimeLimitExceeded:
        if spec.is_async or self.pool is not None:
            return TimeLimitExceeded(seconds)
        return TimeLimitExceeded(seconds, "; its thread cannot be stopped and runs on (use pool='processes')")

    async def _call(
        self,
        spec: TaskSpec,
        signature: Signature,
        values: list[Any],
        limits: Limits,
        report: ProgressReport | None,
        run: _Run,
    ) -> Any:
        if not spec.is_async and self.pool is not None:
            return await self.pool.run(spec, signature, values, limits.soft, report)
        args = [TaskContext(signature, report), *values] if spec.wants_context else values
        if not spec.is_async:
            context = contextvars.copy_context()  # the middleware's context, on the thread too
            call = functools.partial(context.run, run.on_thread, spec.fn, *args)
            return await self.threads.run(call)
        coro = run.coroutine = spec.fn(*args)
        if limits.soft is None:
            return await coro
        work: Interruptible[Any] = Interruptible(coro)
        message = f"soft time limit of {limits.soft:g} s exceeded"
        soft = asyncio.get_running_loop().call_later(limits.soft, work.interrupt, SoftTimeLimitExceeded(message))
        try:
            return await work
        finally:
            soft.cancel()
