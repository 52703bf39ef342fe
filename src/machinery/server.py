"""The Server: registered tasks, configuration, and sending work through the broker."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from ._sync import run_sync
from .config import Config
from .factory import create_backend, create_broker, create_lock
from .periodic import PeriodicEntry, Scheduler
from .registry import TaskSpec
from .result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from .signature import Chain, Chord, Group, Signature, new_task_uuid
from .workflow import ProgressHandler, send_chain, send_chord, send_group

if TYPE_CHECKING:
    from .locks.base import Lock
    from .worker import Worker

P = ParamSpec("P")
R = TypeVar("R")

PrePublishHandler = Callable[[Signature], None]


class Task(Generic[P, R]):
    """A registered task: still callable as the plain function, and sendable.

    ``add.send(1, 2)`` sends ``add`` with those arguments; ``add.signature(1, 2, retry_count=3)``
    builds a Signature for workflows. Keyword arguments are Signature options, never task
    arguments, since task messages carry positional arguments only.
    """

    def __init__(self, server: Server, name: str, fn: Callable[P, R]) -> None:
        self.server = server
        self.name = name
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def signature(self, *args: Any, **options: Any) -> Signature:
        """A Signature of this task with ``args``; ``options`` are Signature fields."""
        return Signature(self.name, list(args), **options)

    def send(self, *args: Any, **options: Any) -> AsyncResult:
        """Send this task now; returns its AsyncResult."""
        return self.server.send_task(self.signature(*args, **options))

    async def asend(self, *args: Any, **options: Any) -> AsyncResult:
        return await self.server.asend_task(self.signature(*args, **options))


class Server:
    """Holds the configuration, the broker, the result backend, the lock and the tasks."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.broker = create_broker(self.config)
        self.backend = create_backend(self.config)
        self._lock: Lock | None = None
        self.tasks: dict[str, TaskSpec] = {}
        self._pre_publish: PrePublishHandler | None = None
        self.periodic = Scheduler(self)

    @property
    def lock(self) -> Lock:
        """The cluster-wide lock (created on first use: only periodic work needs it)."""
        if self._lock is None:
            self._lock = create_lock(self.config)
        return self._lock

    # ------------------------------------------------------------------ registration

    def register_task(self, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` under ``name``; raises TypeError if it cannot be a task."""
        if not name:
            raise ValueError("a task name must not be empty")
        self.tasks[name] = TaskSpec(name, fn)

    def register_tasks(self, tasks: Mapping[str, Callable[..., Any]]) -> None:
        """Register several tasks at once, all or none."""
        specs = {name: TaskSpec(name, fn) for name, fn in tasks.items()}
        self.tasks.update(specs)

    @overload
    def task(self, name: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(self, name: str | None = None) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, name: str | Callable[P, R] | None = None) -> Any:
        """Decorator registering a function as a task (named after the function by default)."""

        def decorate(fn: Callable[P, R]) -> Task[P, R]:
            task_name = name if isinstance(name, str) and name else fn.__name__
            self.register_task(task_name, fn)
            return Task(self, task_name, fn)

        if callable(name):
            return decorate(name)
        return decorate

    def is_task_registered(self, name: str) -> bool:
        return name in self.tasks

    # ------------------------------------------------------------------ sending

    def set_pre_publish_handler(self, handler: PrePublishHandler | None) -> None:
        """Call ``handler(signature)`` just before each signature is published."""
        self._pre_publish = handler

    def prepare(self, signature: Signature) -> Signature:
        """Fill what Go's SendTask fills before publishing: a UUID and empty headers."""
        if not signature.uuid:
            signature.uuid = new_task_uuid()
        if signature.headers is None:
            signature.headers = {}
        return signature

    async def asend_task(self, signature: Signature) -> AsyncResult:
        """Write PENDING, then publish ``signature``; returns its AsyncResult."""
        self.prepare(signature)
        await self.backend.set_pending((signature,))
        if self._pre_publish is not None:
            self._pre_publish(signature)
        await self.broker.publish(signature)
        return AsyncResult(signature.uuid, self.backend)

    def send_task(self, signature: Signature) -> AsyncResult:
        return run_sync(self.asend_task(signature))

    def result(self, task_uuid: str) -> AsyncResult:
        """An AsyncResult for a task sent elsewhere."""
        return AsyncResult(task_uuid, self.backend)

    # ------------------------------------------------------------------ workflows (workflow.py)

    async def asend_chain(self, chain: Chain) -> ChainAsyncResult:
        """Send a chain: its first step now, each next one when the previous one succeeds."""
        return await send_chain(self, chain)

    def send_chain(self, chain: Chain) -> ChainAsyncResult:
        return run_sync(self.asend_chain(chain))

    async def asend_group(
        self, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> list[AsyncResult]:
        """Send a group, at most ``send_concurrency`` messages in flight (0: unlimited).

        Returns the members' results in group order. ``on_progress(published, total)`` is
        called as batches are published. A publish error is raised after the other members
        are published (those still run).
        """
        return await send_group(self, group, send_concurrency, on_progress)

    def send_group(
        self, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> list[AsyncResult]:
        return run_sync(self.asend_group(group, send_concurrency, on_progress))

    async def asend_chord(
        self, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> ChordAsyncResult:
        """Send a chord's group as ``asend_group`` does; a worker sends the callback when it is done."""
        return await send_chord(self, chord, send_concurrency, on_progress)

    def send_chord(
        self, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> ChordAsyncResult:
        return run_sync(self.asend_chord(chord, send_concurrency, on_progress))

    # ------------------------------------------------------------------ periodic (periodic.py)

    def register_periodic_task(self, spec: str, name: str, signature: Signature) -> PeriodicEntry:
        """Send a copy of ``signature`` on every tick of the cron ``spec``, once across the cluster.

        ``spec`` follows Go's robfig/cron ``ParseStandard`` (``*/5 * * * *``, ``@hourly``,
        ``@every 1h30m``, ``CRON_TZ=Europe/Paris 0 9 * * MON-FRI``); a spec that does not
        parse raises ValueError with the reason. Registering a name again replaces the entry.
        Ticks fire in workers (unless started with ``periodic=False``) and in ``run_periodic``.
        """
        return self.periodic.add(spec, name, "task", [signature])

    def register_periodic_chain(self, spec: str, name: str, *signatures: Signature) -> PeriodicEntry:
        """Send a fresh chain of ``signatures`` on every tick of ``spec``."""
        return self.periodic.add(spec, name, "chain", signatures)

    def register_periodic_group(
        self, spec: str, name: str, send_concurrency: int, *signatures: Signature
    ) -> PeriodicEntry:
        """Send a fresh group of ``signatures`` on every tick of ``spec``."""
        return self.periodic.add(spec, name, "group", signatures, send_concurrency)

    def register_periodic_chord(
        self, spec: str, name: str, send_concurrency: int, callback: Signature, *signatures: Signature
    ) -> PeriodicEntry:
        """Send a fresh chord of ``signatures`` with ``callback`` on every tick of ``spec``."""
        return self.periodic.add(spec, name, "chord", signatures, send_concurrency, callback)

    def periodic_entries(self) -> list[PeriodicEntry]:
        """The registered periodic entries, by name."""
        return self.periodic.entries()

    def remove_periodic(self, name: str) -> bool:
        """Stop sending the periodic entry ``name``; False if there was none."""
        return self.periodic.remove(name)

    async def arun_periodic(self, install_signal_handlers: bool = False) -> None:
        """Run only the periodic scheduler (no worker) until ``stop_periodic()`` or a signal."""
        await self.periodic.run(install_signal_handlers=install_signal_handlers)

    def run_periodic(self) -> None:
        """Run the periodic scheduler in this thread until SIGINT/SIGTERM or ``stop_periodic()``."""
        asyncio.run(self.arun_periodic(install_signal_handlers=not self.config.no_unix_signals))

    def stop_periodic(self) -> None:
        """Stop ``run_periodic``/``arun_periodic`` and workers' schedulers (from any thread)."""
        self.periodic.stop_all()

    # ------------------------------------------------------------------ workers

    def new_worker(
        self, consumer_tag: str = "", concurrency: int = 0, queue: str | None = None, periodic: bool = True
    ) -> Worker:
        """A worker for this server; ``concurrency=0`` means twice the CPU count.

        With ``periodic`` (the default) the worker also runs the periodic scheduler.
        """
        from .worker import Worker

        return Worker(self, consumer_tag=consumer_tag, concurrency=concurrency, queue=queue, periodic=periodic)

    async def aclose(self) -> None:
        """Close connections held by the broker, backend and lock."""
        await self.broker.aclose()
        await self.backend.aclose()
        if self._lock is not None:
            await self._lock.aclose()

    def close(self) -> None:
        run_sync(self.aclose())

    async def aclose_loop_connections(self) -> None:
        """Close the connections the running event loop holds (a worker's loop, when it ends)."""
        await self.broker.aclose_loop_connections()
        await self.backend.aclose_loop_connections()
        if self._lock is not None:
            await self._lock.aclose_loop_connections()
