"""A prefork-style pool: ``def`` tasks in child processes, for CPU-bound work and real time limits.

Children are *spawned* (a fresh interpreter each: forking a process that runs threads and
an event loop is not safe) and import the task's function by name (``module:qualname``), so a
task must be defined at module level in an importable module; the worker refuses to start
otherwise. Each child runs one call at a time:

* the soft time limit is a ``SIGUSR1`` that raises ``SoftTimeLimitExceeded`` in the task;
* the hard limit, a revocation with ``terminate``, and an abort kill the child (SIGKILL);
* a child that dies (a crash, the OOM killer) fails its call with ``WorkerProcessDied``;
* after ``max_tasks_per_child`` calls, or once its peak memory passes ``max_memory_per_child``
  MB, a child is retired after its call;

and in each case a new child takes its place. ``ctx.progress()`` in a child reaches the
parent over the child's pipe.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import pickle
import resource
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import log
from ..errors import ConfigError, SoftTimeLimitExceeded, WorkerProcessDied
from ..registry import ProgressReport, TaskContext, TaskSpec
from ..signature import Signature
from .tracebacks import carry, format_failure

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

#: Seconds a child may take to start and import its tasks before the pool gives up on it.
START_TIMEOUT = 60.0
#: Seconds an idle child gets to exit when the pool closes, before it is killed.
EXIT_TIMEOUT = 5.0


class RemoteTaskError(Exception):
    """An exception raised in a child that could not be sent back as itself (not picklable)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def task_path(spec: TaskSpec) -> tuple[str, str]:
    """Where a child finds ``spec``'s function; ConfigError if it cannot import it."""
    fn = spec.fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigError(
            f"task {spec.name!r} cannot run in the process pool: its function ({module}.{qualname}) is not "
            "importable by name; define it at module level in an importable module"
        )
    try:
        found = _resolve(module, qualname)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task {spec.name!r} cannot run in the process pool: {exc}") from None
    if found is not fn:
        raise ConfigError(
            f"task {spec.name!r} cannot run in the process pool: {module}.{qualname} is not the registered function"
        )
    return module, qualname


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    """The function at ``module.qualname`` (a ``Task`` handle is unwrapped to its function)."""
    target: Any = sys.modules.get("__mp_main__") if module == "__main__" and "__mp_main__" in sys.modules else None
    if target is None:
        target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    inner = getattr(target, "fn", None)
    return inner if callable(inner) and getattr(target, "name", None) is not None else target  # type: ignore[no-any-return]


@dataclass(eq=False)
class _Call:
    id: int
    name: str
    future: asyncio.Future[Any]
    report: ProgressReport | None
    soft: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    conn: Connection
    ready: asyncio.Future[None]
    calls: int = 0
    call: _Call | None = None
    gone: bool = False
    peak_kb: int = field(default=0)


class ProcessPool:
    """``size`` child processes running ``def`` tasks for one worker."""

    def __init__(self, size: int, max_tasks_per_child: int | None = None, max_memory_per_child: float | None = None):
        self.size = size
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_kb = None if max_memory_per_child is None else int(max_memory_per_child * 1024)
        import multiprocessing  # here, not at the top: a worker without a process pool never loads it

        self._context = multiprocessing.get_context("spawn")
        self._children: set[_Child] = set()
        self._idle: asyncio.Queue[_Child] | None = None
        self._modules: list[str] = []
        self._ids = itertools.count()
        self._closing = False
        self._started = False

    @property
    def busy(self) -> int:
        """How many children are running a call now."""
        return sum(1 for child in self._children if child.call is not None)

    @property
    def pids(self) -> list[int]:
        """The children's process ids (for tests and ``inspect``)."""
        return sorted(child.process.pid for child in self._children if child.process.pid is not None)

    async def start(self, tasks: Mapping[str, TaskSpec]) -> None:
        """Check that every ``def`` task can be imported in a child, then start the children."""
        paths = [task_path(spec) for spec in tasks.values() if not spec.is_async]
        self._modules = sorted({module for module, _ in paths})
        self._idle = asyncio.Queue()
        children = [self._spawn() for _ in range(self.size)]
        await asyncio.wait_for(asyncio.gather(*(child.ready for child in children)), START_TIMEOUT)
        self._started = True
        log.logger.info("Process pool started: %d children (pids %s)", self.size, ", ".join(map(str, self.pids)))

    def _spawn(self) -> _Child:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_child_main, args=(child_end, self._modules), name="machinery-pool", daemon=True
        )
        process.start()
        child_end.close()
        loop = asyncio.get_running_loop()
        child = _Child(process, parent_end, loop.create_future())
        self._children.add(child)
        loop.add_reader(parent_end.fileno(), self._readable, child)
        loop.add_reader(process.sentinel, self._ended, child)
        return child

    async def run(
        self, spec: TaskSpec, signature: Signature, values: list[Any], soft: float | None, report: ProgressReport | None
    ) -> Any:
        """Run one call in an idle child; raises what the task raised, or ``WorkerProcessDied``.

        Cancelling the caller (a hard limit, a revocation, an abort) kills the child.
        """
        assert self._idle is not None, "the pool is not started"
        child = await self._idle.get()
        loop = asyncio.get_running_loop()
        call = _Call(next(self._ids), spec.name, loop.create_future(), report)
        child.call = call
        module, qualname = task_path(spec)
        child.conn.send(("run", call.id, module, qualname, spec.wants_context, signature, values, soft))
        if soft is not None:
            call.soft = loop.call_later(soft, self._signal, child, call, signal.SIGUSR1)
        try:
            return await call.future
        except asyncio.CancelledError:
            # Cancelling this task cancelled the future it awaited, too: unless the child had
            # already answered, it is still running the call.
            if not call.future.done() or call.future.cancelled():
                self._kill(child)
            raise
        finally:
            if call.soft is not None:
                call.soft.cancel()

    def _signal(self, child: _Child, call: _Call, signum: int) -> None:
        if child.call is call and not child.gone and child.process.pid is not None:
            os.kill(child.process.pid, signum)

    def _kill(self, child: _Child) -> None:
        if not child.gone:
            child.process.kill()  # its sentinel reports the end, and a new child replaces it

    # ------------------------------------------------------------------ what children say

    def _readable(self, child: _Child) -> None:
        try:
            while child.conn.poll():
                self._received(child, child.conn.recv())
        except (EOFError, OSError):
            self._ended(child)

    def _received(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            if not child.ready.done():
                child.ready.set_result(None)
            self._make_idle(child)
            return
        if kind == "unimportable":
            if not child.ready.done():
                child.ready.set_exception(
                    ConfigError(
                        f"the process pool's children cannot import {message[1]} ({message[2]}): a child is a "
                        "fresh interpreter, so the module must be importable by name from sys.path (or "
                        "PYTHONPATH) as the worker's own directory sees it, not loaded from a file path"
                    )
                )
            return
        call = child.call
        if call is None or message[1] != call.id:
            return
        if kind == "progress":
            if call.report is not None:
                call.report(message[2], message[3])
            return
        _, _, ok, payload, peak_kb = message
        child.call, child.calls, child.peak_kb = None, child.calls + 1, peak_kb
        if not call.future.done():
            if ok:
                call.future.set_result(payload)
            else:
                call.future.set_exception(payload)
        if self._should_retire(child):
            self._retire(child)
        else:
            self._make_idle(child)

    def _should_retire(self, child: _Child) -> bool:
        if self.max_tasks_per_child is not None and child.calls >= self.max_tasks_per_child:
            return True
        return self.max_memory_kb is not None and child.peak_kb > self.max_memory_kb

    def _retire(self, child: _Child) -> None:
        log.logger.info(
            "Pool child %s retires after %d calls (peak %.0f MB)", child.process.pid, child.calls, child.peak_kb / 1024
        )
        self._forget(child)
        try:
            child.conn.send(("exit",))
        except OSError:
            child.process.kill()
        if not self._closing:
            self._spawn()

    def _make_idle(self, child: _Child) -> None:
        assert self._idle is not None
        if not child.gone and not self._closing:
            self._idle.put_nowait(child)

    def _ended(self, child: _Child) -> None:
        """The child exited: fail its call (unless that call was stopped) and replace it."""
        if child.gone:
            return
        self._forget(child)
        # Its sentinel closes as it exits, a moment before it can be reaped: wait that moment
        # so that the error can say how it ended.
        child.process.join(1.0)
        call = child.call
        if call is not None and not call.future.done():
            code = child.process.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
            call.future.set_exception(
                WorkerProcessDied(f"the pool process running {call.name} ({child.process.pid}) died: {how}")
            )
        if not child.ready.done():
            try:  # its last words (why it could not start) may still be in the pipe
                while child.conn.poll():
                    self._received(child, child.conn.recv())
            except (EOFError, OSError):
                pass
        if not child.ready.done():
            child.ready.set_exception(WorkerProcessDied(f"a pool process could not start ({child.process.exitcode})"))
        if child.ready.cancelled() or child.ready.exception() is not None:
            # A child that never started is not replaced (the next would fail the same way):
            # at start the pool fails with the reason; later, it runs with one child fewer.
            if self._started:
                log.logger.error(
                    "A new pool child could not start (%s); the pool has %d children left",
                    child.ready.exception() if not child.ready.cancelled() else "cancelled",
                    len(self._children),
                )
            return
        if not self._closing:
            log.logger.warning("Pool child %s ended; starting another", child.process.pid)
            self._spawn()

    def _forget(self, child: _Child) -> None:
        child.gone = True
        self._children.discard(child)
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.conn.fileno())
        loop.remove_reader(child.process.sentinel)

    # ------------------------------------------------------------------ closing

    async def close(self, kill: bool = False) -> None:
        """End every child: idle ones exit, running ones are killed if ``kill`` (an abort)."""
        self._closing = True
        children = list(self._children)
        for child in children:
            self._forget(child)
            if kill or child.call is not None:
                child.process.kill()
            else:
                with _suppress_os():
                    child.conn.send(("exit",))
        loop = asyncio.get_running_loop()
        for child in children:
            await loop.run_in_executor(None, child.process.join, EXIT_TIMEOUT)
            if child.process.is_alive():
                child.process.kill()
                await loop.run_in_executor(None, child.process.join, EXIT_TIMEOUT)
            child.conn.close()


class _suppress_os:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


# --------------------------------------------------------------------------- the child

_current_call: int | None = None
_current_soft: float | None = None


def _on_soft_limit(signum: int, frame: object) -> None:
    # Only while a call runs: a late signal must not hit the loop between calls.
    if _current_call is not None:
        raise SoftTimeLimitExceeded(f"soft time limit of {_current_soft:g} s exceeded")


def _child_main(conn: Connection, modules: list[str]) -> None:
    """A pool child: import the tasks' modules, then run calls until told to exit."""
    global _current_call, _current_soft
    # The worker decides how to stop; a Ctrl-C or a TERM to the process group is for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _on_soft_limit)
    for module in modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # the worker cannot start: tell it why, in its words
            conn.send(("unimportable", module, f"{type(exc).__name__}: {exc}"))
            return
    conn.send(("ready",))
    functions: dict[tuple[str, str], Callable[..., Any]] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the worker is gone
        if message[0] == "exit":
            return
        _, call_id, module, qualname, wants_context, signature, values, soft = message
        fn = functions.get((module, qualname))
        if fn is None:
            fn = functions[(module, qualname)] = _resolve(module, qualname)

        def report(fraction: float, text: str, call_id: int = call_id) -> None:
            conn.send(("progress", call_id, fraction, text))

        args = [TaskContext(signature, report), *values] if wants_context else values
        _current_call, _current_soft = call_id, soft
        try:
            ok, payload = True, fn(*args)
        except BaseException as exc:
            ok, payload = False, exc
        finally:
            _current_call = None
        conn.send(("done", call_id, *_portable(ok, payload), _peak_rss_kb()))


def _peak_rss_kb() -> int:
    """This process's own peak resident memory in KiB.

    Linux carries ``ru_maxrss`` over from the parent across the spawn's fork and exec, so a
    child of a worker that is itself over the limit would be retired after every call: read the
    peak of this process's own memory (``VmHWM``) instead where the kernel reports it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes there, KiB elsewhere


def _portable(ok: bool, payload: Any) -> tuple[bool, Any]:
    """(ok, payload) as they can cross the pipe: an exception that does not pickle becomes a
    ``RemoteTaskError`` with its type and text, and carries its traceback's text either way."""
    if ok:
        try:
            pickle.dumps(payload)
            return True, payload
        except Exception as exc:
            why = f"the task's result cannot be sent back from its process: {exc}"
            return False, RemoteTaskError(type(exc).__name__, why)
    text = format_failure(payload)
    try:
        pickle.loads(pickle.dumps(payload))
    except Exception:
        payload = RemoteTaskError(type(payload).__name__, str(payload) or type(payload).__name__)
    carry(payload, text)
    return False, payload
