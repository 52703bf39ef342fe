"""The Server: registered tasks, configuration, and sending work through the broker."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from ._sync import run_sync
from .config import Config
from .factory import create_backend, create_broker, create_lock
from .registry import TaskSpec
from .result import AsyncResult
from .signature import Signature, new_task_uuid

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
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

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

    # ------------------------------------------------------------------ workers

    def new_worker(self, consumer_tag: str = "", concurrency: int = 0, queue: str | None = None) -> Worker:
        """A worker for this server; ``concurrency=0`` means twice the CPU count."""
        from .worker import Worker

        return Worker(self, consumer_tag=consumer_tag, concurrency=concurrency, queue=queue)

    async def aclose(self) -> None:
        """Close connections held by the broker, backend and lock."""
        await self.broker.aclose()
        await self.backend.aclose()
        if self._lock is not None:
            await self._lock.aclose()

    def close(self) -> None:
        run_sync(self.aclose())
