"""The Server: registered tasks, configuration, and sending work through the broker."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, overload

from ._sync import run_sync
from .backends import create_backend
from .brokers import DeadLetter, create_broker
from .config import Config
from .controls import SEND_OPTIONS, TaskOptions, apply_send_options
from .dispatch import Dispatcher, ProgressHandler
from .locks import Lock, create_lock
from .middleware import HandlerAdapter, Middleware, MiddlewareStack
from .periodic import PeriodicEntry, Scheduler
from .registry import TaskSpec
from .result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from .retry import Retries
from .signature import Chain, Chord, Group, Signature
from .uniqueness import ReleaseUnique
from .worker import Worker
from .workflow import Callbacks, ChordCompletion, send_chain, send_chord, send_group

P = ParamSpec("P")
R = TypeVar("R")

PrePublishHandler = Callable[[Signature], None]


class Task(Generic[P, R]):
    """A registered task: still callable as the plain function, and sendable.

    ``add.send(1, 2)`` sends ``add`` with those arguments; ``add.signature(1, 2, retry_count=3)``
    builds a Signature for workflows. Keyword arguments are Signature fields (``retry_count``,
    ``eta``, ``priority``...) or the per-send controls ``time_limit``, ``soft_time_limit``,
    ``unique_for`` and ``unique_key``; never task arguments, since task messages carry
    positional arguments only.
    """

    def __init__(self, server: Server, name: str, fn: Callable[P, R]) -> None:
        self.server = server
        self.name = name
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def signature(self, *args: Any, **options: Any) -> Signature:
        """A Signature of this task with ``args``; ``options`` are Signature fields and controls."""
        controls = {k: options.pop(k) for k in list(options) if k in SEND_OPTIONS}
        return apply_send_options(Signature(self.name, list(args), **options), controls)

    def send(self, *args: Any, **options: Any) -> AsyncResult:
        """Send this task now; returns its AsyncResult."""
        return self.server.send_task(self.signature(*args, **options))

    async def asend(self, *args: Any, **options: Any) -> AsyncResult:
        return await self.server.asend_task(self.signature(*args, **options))


class Server:
    """Holds the configuration, the broker, the result backend, the lock, the tasks and the middleware.

    ``middleware`` runs around every send of this server and every task its workers
    process (see ``machinery.Middleware``); more can be added with ``add_middleware``.
    """

    def __init__(self, config: Config | None = None, middleware: Iterable[Middleware] = ()) -> None:
        self.config = config if config is not None else Config()
        self.broker = create_broker(self.config)
        self.backend = create_backend(self.config)
        self._lock: Lock | None = None
        self.tasks: dict[str, TaskSpec] = {}
        self.middleware = MiddlewareStack(middleware)
        self.dispatcher = Dispatcher(self.broker, self.backend, self.middleware, lambda: self.lock)
        # Go's worker behaviour, as middleware (they need the dispatcher, which needs the stack).
        self.middleware.set_builtin(
            [
                ChordCompletion(self.backend, lambda: self.lock, self.dispatcher),
                Callbacks(self.dispatcher),
                Retries(self.dispatcher),
                ReleaseUnique(lambda: self.lock),
            ]
        )
        self.periodic = Scheduler(self.config, self.dispatcher, lambda: self.lock)
        #: Sync calls run on the calling thread's own loop only where the drivers need nothing
        #: from the loop between calls (see ``Broker.idle_loop_ok``).
        self._sync_here = self.broker.idle_loop_ok and self.backend.idle_loop_ok
        self._pre_publish: HandlerAdapter | None = None

    @property
    def lock(self) -> Lock:
        """The cluster-wide lock (created on first use: only periodic work needs it)."""
        if self._lock is None:
            self._lock = create_lock(self.config)
        return self._lock

    def _sync(self, coro: Coroutine[Any, Any, R]) -> R:
        return run_sync(coro, here=self._sync_here)

    # ------------------------------------------------------------------ registration

    def register_task(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        rate_limit: str | None = None,
    ) -> None:
        """Register ``fn`` under ``name``; raises TypeError if it cannot be a task.

        ``time_limit``: seconds after which a run is stopped and fails (or retries);
        ``soft_time_limit``: seconds after which the task gets ``SoftTimeLimitExceeded`` to
        clean up; ``rate_limit``: at most so many runs across the cluster (``"100/s"``,
        ``"30/m"``, ``"5/h"``), the rest waiting their turn.
        """
        if not name:
            raise ValueError("a task name must not be empty")
        options = TaskOptions.make(time_limit, soft_time_limit, rate_limit)
        self.tasks[name] = TaskSpec(name, fn, options)

    def register_tasks(self, tasks: Mapping[str, Callable[..., Any]]) -> None:
        """Register several tasks at once, all or none."""
        specs = {name: TaskSpec(name, fn) for name, fn in tasks.items()}
        self.tasks.update(specs)

    @overload
    def task(self, name: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        rate_limit: str | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        name: str | Callable[P, R] | None = None,
        *,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        rate_limit: str | None = None,
    ) -> Any:
        """Decorator registering a function as a task (named after the function by default),
        with the controls of ``register_task``."""

        def decorate(fn: Callable[P, R]) -> Task[P, R]:
            task_name = name if isinstance(name, str) and name else fn.__name__
            self.register_task(
                task_name, fn, time_limit=time_limit, soft_time_limit=soft_time_limit, rate_limit=rate_limit
            )
            return Task(self, task_name, fn)

        if callable(name):
            return decorate(name)
        return decorate

    def is_task_registered(self, name: str) -> bool:
        return name in self.tasks

    # ------------------------------------------------------------------ middleware

    def add_middleware(self, middleware: Middleware) -> None:
        """Run ``middleware`` around this server's sends and its workers' tasks, after the others."""
        self.middleware.add(middleware)

    def set_pre_publish_handler(self, handler: PrePublishHandler | None) -> None:
        """Call ``handler(signature)`` before each signature is published (Go's single-slot
        handler; a ``before_publish`` middleware underneath). None removes it."""
        if self._pre_publish is not None:
            self.middleware.remove(self._pre_publish)
            self._pre_publish = None
        if handler is not None:
            self._pre_publish = HandlerAdapter(pre_publish=handler)
            self.middleware.add(self._pre_publish)

    # ------------------------------------------------------------------ sending

    async def asend_task(self, signature: Signature) -> AsyncResult:
        """Write PENDING, then publish ``signature``; returns its AsyncResult (for a unique
        task whose equal is pending or running, that task's, and nothing is sent)."""
        return AsyncResult(await self.dispatcher.send(signature), self.backend)

    def send_task(self, signature: Signature) -> AsyncResult:
        return self._sync(self.asend_task(signature))

    def result(self, task_uuid: str) -> AsyncResult:
        """An AsyncResult for a task sent elsewhere."""
        return AsyncResult(task_uuid, self.backend)

    # ------------------------------------------------------------------ workflows

    async def asend_chain(self, chain: Chain) -> ChainAsyncResult:
        """Send a chain: its first step now, each next one when the previous one succeeds."""
        return await send_chain(self.dispatcher, chain)

    def send_chain(self, chain: Chain) -> ChainAsyncResult:
        return self._sync(self.asend_chain(chain))

    async def asend_group(
        self, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> list[AsyncResult]:
        """Send a group, at most ``send_concurrency`` messages in flight (0: unlimited).

        Returns the members' results in group order. ``on_progress(published, total)`` is
        called as batches are published. A publish error is raised after the other members
        are published (those still run).
        """
        return await send_group(self.dispatcher, group, send_concurrency, on_progress)

    def send_group(
        self, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> list[AsyncResult]:
        return self._sync(self.asend_group(group, send_concurrency, on_progress))

    async def asend_chord(
        self, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> ChordAsyncResult:
        """Send a chord's group as ``asend_group`` does; a worker sends the callback when it is done."""
        return await send_chord(self.dispatcher, chord, send_concurrency, on_progress)

    def send_chord(
        self, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> ChordAsyncResult:
        return self._sync(self.asend_chord(chord, send_concurrency, on_progress))

    # ------------------------------------------------------------------ periodic

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
        self,
        consumer_tag: str = "",
        concurrency: int = 0,
        queue: str | None = None,
        periodic: bool = True,
        *,
        pool: str = "threads",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: float | None = None,
    ) -> Worker:
        """A worker for this server; ``concurrency=0`` means twice the CPU count.

        With ``periodic`` (the default) the worker also runs the periodic scheduler.
        ``pool="processes"`` runs ``def`` tasks in ``concurrency`` child processes (for CPU-bound
        work and enforceable time limits), recycled after ``max_tasks_per_child`` tasks or once
        they pass ``max_memory_per_child`` MB; ``async def`` tasks always run on the worker's
        loop. ``time_limit``/``soft_time_limit`` are the defaults for tasks that set none.
        """
        return Worker(
            self,
            consumer_tag=consumer_tag,
            concurrency=concurrency,
            queue=queue,
            periodic=periodic,
            pool=pool,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )

    # ------------------------------------------------------------------ controls

    async def arevoke(self, task_uuid: str, terminate: bool = False) -> None:
        """Revoke a task: a worker that takes it skips it, and with ``terminate`` a worker that
        runs it stops it (see ``AsyncResult.arevoke``)."""
        await self.result(task_uuid).arevoke(terminate)

    def revoke(self, task_uuid: str, terminate: bool = False) -> None:
        self._sync(self.arevoke(task_uuid, terminate))

    # ------------------------------------------------------------------ inspection

    async def aget_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        """The tasks waiting in ``queue`` (the default queue if None), oldest first."""
        return await self.broker.get_pending_tasks(queue)

    def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        return self._sync(self.aget_pending_tasks(queue))

    async def aget_delayed_tasks(self) -> list[Signature]:
        """The tasks waiting for their ETA, soonest first."""
        return await self.broker.get_delayed_tasks()

    def get_delayed_tasks(self) -> list[Signature]:
        return self._sync(self.aget_delayed_tasks())

    async def adead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The messages of ``queue`` that could not be processed, with why, oldest first."""
        return await self.broker.dead_letters(queue)

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        return self._sync(self.adead_letters(queue))

    async def arequeue_dead(self, queue: str | None = None) -> int:
        """Put the dead letters of ``queue`` back on it; returns how many."""
        return await self.broker.requeue_dead(queue)

    def requeue_dead(self, queue: str | None = None) -> int:
        return self._sync(self.arequeue_dead(queue))

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Close connections held by the broker, backend and lock."""
        await self.broker.close()
        await self.backend.close()
        if self._lock is not None:
            await self._lock.close()

    def close(self) -> None:
        self._sync(self.aclose())

    async def aclose_loop_connections(self) -> None:
        """Close the connections the running event loop holds (a worker's loop, when it ends)."""
        await self.broker.close_loop_connections()
        await self.backend.close_loop_connections()
        if self._lock is not None:
            await self._lock.close_loop_connections()
