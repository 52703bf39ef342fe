"""The middleware seam: code that runs around every publish and every task a worker processes.

Subclass ``Middleware`` and override the hooks you need; each may be a plain method or an
``async def``. Give middleware to ``Server(config, middleware=[...])`` or
``server.add_middleware(m)``: it runs in every send of that server and every worker it makes.

Order. ``before_*`` hooks run in the order the middleware was given, ``after_*`` hooks in the
reverse order, so the first middleware wraps all the others. Yours wrap the built-in ones
(retries, on_success/on_error callbacks, chord completion): your ``before_process`` runs
before theirs and your ``after_process`` after theirs, when callbacks have been sent.

Failures. A hook that raises is logged with the middleware's class name and the worker goes
on: a middleware's bug never stops a worker or loses a message.

Context. ``before_process``, the task function and ``after_process`` run in one
``contextvars`` context (for ``def`` tasks too, on their thread), so a context variable set in
``before_process`` is visible inside the task: what tracing needs.

The life of a task, and the hook at each step::

    client    before_publish -> PENDING written -> published -> after_publish
    worker    message taken -> before_process -> RECEIVED, STARTED -> the task runs
              -> before_store (may turn a FAILURE into a RETRY) -> final state written
              -> after_process -> message acked -> after_ack

A message that cannot be run gives ``after_requeue`` (a task this worker does not know) or
``after_dead_letter`` (a message that is not a task).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import log
from .signature import Signature
from .types import TaskResult

HookResult = Awaitable[None] | None


@dataclass(slots=True)
class Outcome:
    """What processing a task came to, as ``after_process`` sees it.

    ``state`` is SUCCESS, FAILURE or RETRY; ``results`` the task's return values as Python
    values (a list, empty unless SUCCESS); ``error`` the stored error text (``""`` on
    success); ``retry_in`` the seconds until the retry runs (None unless RETRY); ``duration``
    the seconds the task function ran; ``exception`` what it raised, if anything.
    """

    state: str
    results: list[Any] = field(default_factory=list)
    error: str = ""
    retry_in: float | None = None
    duration: float = 0.0
    exception: BaseException | None = None
    #: The results as they are stored (Go's ``{Type, Value}``), for callbacks to pass on.
    task_results: list[TaskResult] = field(default_factory=list)


class Middleware:
    """Base class with a no-op for every hook; override the ones you need (plain or ``async``)."""

    def before_publish(self, signature: Signature) -> HookResult:
        """Before a signature is sent (its UUID and headers are set; headers may be changed)."""

    def after_publish(self, signature: Signature) -> HookResult:
        """After a signature was published (PENDING is written, the broker has the message)."""

    def before_process(self, signature: Signature) -> HookResult:
        """A worker took the message of a registered task; nothing has been written yet."""

    def before_store(self, signature: Signature, outcome: Outcome) -> HookResult:
        """The task has run; its outcome is about to be stored. Revise it here: the built-in
        retries turn a FAILURE into a RETRY (``outcome.state``, ``outcome.retry_in``)."""

    def after_process(self, signature: Signature, outcome: Outcome) -> HookResult:
        """The outcome is stored (and, for the built-ins, retries and callbacks are sent)."""

    def after_ack(self, signature: Signature) -> HookResult:
        """The message is settled for good: the broker will not deliver it again."""

    def after_requeue(self, signature: Signature) -> HookResult:
        """The message went back to its queue (a task this worker does not know)."""

    def after_dead_letter(self, body: bytes, reason: str) -> HookResult:
        """A message that cannot be processed was moved to the dead letters, with ``reason``."""

    def worker_boot(self, worker: Any) -> HookResult:
        """A ``Worker`` is starting, before it takes its first message."""

    def worker_shutdown(self, worker: Any) -> HookResult:
        """A ``Worker`` has stopped taking messages and its running tasks have ended."""


HOOKS = (
    "before_publish",
    "after_publish",
    "before_process",
    "before_store",
    "after_process",
    "after_ack",
    "after_requeue",
    "after_dead_letter",
    "worker_boot",
    "worker_shutdown",
)

_Call = tuple[str, Callable[..., HookResult]]


class MiddlewareStack:
    """Middleware in order, and the calls of each hook (only the overridden ones are called).

    ``middleware`` is the users' list; ``builtin`` comes after it, so that user middleware
    wraps the built-in behaviour (see the module docstring).
    """

    def __init__(self, middleware: Iterable[Middleware] = (), builtin: Iterable[Middleware] = ()) -> None:
        self._user: list[Middleware] = []
        self._builtin: list[Middleware] = list(builtin)
        self._calls: dict[str, list[_Call]] = {}
        for item in middleware:
            self._check(item)
            self._user.append(item)
        self._rebuild()

    @property
    def middleware(self) -> list[Middleware]:
        """Every middleware in ``before_*`` order (the users', then the built-in ones)."""
        return [*self._user, *self._builtin]

    def add(self, middleware: Middleware) -> None:
        """Append ``middleware`` after the users' others (still before the built-in ones)."""
        self._check(middleware)
        self._user.append(middleware)
        self._rebuild()

    def remove(self, middleware: Middleware) -> None:
        """Take ``middleware`` out again (no error if it is not there)."""
        self._user = [m for m in self._user if m is not middleware]
        self._rebuild()

    def set_builtin(self, builtin: Sequence[Middleware]) -> None:
        """Set the built-in middleware (made by the server, which needs the stack first)."""
        self._builtin = list(builtin)
        self._rebuild()

    def including(self, extra: Sequence[Middleware]) -> MiddlewareStack:
        """A new stack with ``extra`` appended to the users' middleware (a worker's adapters)."""
        if not extra:
            return self
        return MiddlewareStack([*self._user, *extra], self._builtin)

    @staticmethod
    def _check(middleware: Middleware) -> None:
        if not isinstance(middleware, Middleware):
            raise TypeError(f"middleware must be a machinery.Middleware, got {middleware!r}")

    def _rebuild(self) -> None:
        ordered = self.middleware
        calls: dict[str, list[_Call]] = {}
        for hook in HOOKS:
            base = getattr(Middleware, hook)
            overridden = [m for m in ordered if getattr(type(m), hook, base) is not base]
            if hook.startswith("after_") or hook == "worker_shutdown":
                overridden.reverse()
            calls[hook] = [(type(m).__name__, getattr(m, hook)) for m in overridden]
        self._calls = calls

    # ------------------------------------------------------------------ running hooks

    async def _run(self, hook: str, *args: Any) -> None:
        for name, call in self._calls[hook]:
            try:
                result = call(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                log.logger.exception("Middleware %s raised in %s; carrying on", name, hook)

    async def before_publish(self, signature: Signature) -> None:
        await self._run("before_publish", signature)

    async def after_publish(self, signature: Signature) -> None:
        await self._run("after_publish", signature)

    async def before_process(self, signature: Signature) -> None:
        await self._run("before_process", signature)

    async def before_store(self, signature: Signature, outcome: Outcome) -> None:
        await self._run("before_store", signature, outcome)

    async def after_process(self, signature: Signature, outcome: Outcome) -> None:
        await self._run("after_process", signature, outcome)

    async def after_ack(self, signature: Signature) -> None:
        await self._run("after_ack", signature)

    async def after_requeue(self, signature: Signature) -> None:
        await self._run("after_requeue", signature)

    async def after_dead_letter(self, body: bytes, reason: str) -> None:
        await self._run("after_dead_letter", body, reason)

    async def worker_boot(self, worker: Any) -> None:
        await self._run("worker_boot", worker)

    async def worker_shutdown(self, worker: Any) -> None:
        await self._run("worker_shutdown", worker)


class HandlerAdapter(Middleware):
    """Go-style single-slot handlers as middleware: ``set_pre_publish_handler`` and the worker's
    ``set_pre_task_handler``/``set_post_task_handler`` install one of these."""

    def __init__(
        self,
        pre_publish: Callable[[Signature], None] | None = None,
        pre_task: Callable[[Signature], None] | None = None,
        post_task: Callable[[Signature], None] | None = None,
    ) -> None:
        self.pre_publish = pre_publish
        self.pre_task = pre_task
        self.post_task = post_task

    def before_publish(self, signature: Signature) -> None:
        if self.pre_publish is not None:
            self.pre_publish(signature)

    def before_process(self, signature: Signature) -> None:
        if self.pre_task is not None:
            self.pre_task(signature)

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        if self.post_task is not None:
            self.post_task(signature)
