"""The Worker: take messages, run tasks, store their outcomes, shut down cleanly.

Processing follows Go Machinery's ``Process`` (docs/wire.md §6), with Go's retries, callbacks
and chord completion as built-in middleware, and these differences, all on the side of
losing nothing:

* a message leaves the broker only after its final state is written and its retries and
  callbacks are sent; while the backend or broker is away those writes are retried (the
  message stays held), so a task that has run is not run again because of an outage;
* bad messages go to a dead-letter place instead of stopping the worker or vanishing;
* argument-conversion failures fail that task and the worker goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

from . import log
from ._backoff import Backoff, Outage, Reporter, persist
from .backends.base import Backend
from .brokers.base import Broker, Consumer, Delivery
from .config import Config, redact_url
from .errors import ArgumentError, MessageDecodeError, ResultTypeError, UnsupportedOperation
from .middleware import HandlerAdapter, MiddlewareStack, Outcome
from .periodic import Scheduler
from .registry import TaskSpec
from .signature import Signature
from .state import FAILURE, RECEIVED, STARTED, SUCCESS, RunningTask, TaskState, WorkerInfo
from .types import encode_results

T = TypeVar("T")

ErrorHandler = Callable[[BaseException], None]
TaskHandler = Callable[[Signature], None]
PreConsumeHandler = Callable[["Worker"], bool]

#: Seconds between two looks at the pre-consume handler while it says no.
PRE_CONSUME_PAUSE = 0.2
#: A message of a task this worker does not know goes back to the queue for this long the
#: first time it is seen here, twice as long each time after, up to the maximum: it is left
#: for a worker that knows it without this one spinning on it, and nothing else waits.
UNKNOWN_TASK_FIRST_DELAY = 1.0
UNKNOWN_TASK_MAX_DELAY = 30.0
#: Unknown messages remembered (first seen, times seen) per worker.
UNKNOWN_TASKS_REMEMBERED = 10_000


class WorkerHost(Protocol):
    """What a worker needs of the Server it works for (a ``Server`` is one)."""

    config: Config
    broker: Broker
    backend: Backend
    middleware: MiddlewareStack
    periodic: Scheduler

    @property
    def tasks(self) -> Mapping[str, TaskSpec]: ...

    async def aclose_loop_connections(self) -> None: ...


def error_text(exc: BaseException) -> str:
    """The error text stored for a failed task (Go stores the error's message)."""
    return str(exc) or type(exc).__name__


class Worker:
    """Consumes one queue and runs at most ``concurrency`` tasks at a time."""

    def __init__(
        self,
        server: WorkerHost,
        consumer_tag: str = "",
        concurrency: int = 0,
        queue: str | None = None,
        periodic: bool = True,
    ):
        self.server = server
        self.periodic = periodic  # run the server's periodic scheduler beside consuming
        self.consumer_tag = consumer_tag or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.concurrency = concurrency if concurrency > 0 else 2 * (os.cpu_count() or 1)
        self.queue = queue or server.config.default_queue
        self._error_handler: ErrorHandler | None = None
        self._pre_consume: PreConsumeHandler | None = None
        self._handlers = HandlerAdapter()
        self._middleware = server.middleware
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._aborting = False
        self._quit_requested = threading.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0  # slots taken: fetched messages whose task function has not yet returned
        self._slot_freed: asyncio.Event | None = None
        self._executor: TaskThreads | None = None
        self._unknown: OrderedDict[str, _Sighting] = OrderedDict()
        self._in_flight: dict[int, RunningTask] = {}  # by id() of the processing coroutine's task
        self._unknown_warned: set[str] = set()
        self.started = threading.Event()
        self._started_at: datetime | None = None

    # ------------------------------------------------------------------ hooks (docs/wire.md §14)

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """Called with task failures and broker errors instead of logging them."""
        self._error_handler = handler

    def set_pre_task_handler(self, handler: TaskHandler | None) -> None:
        """Called with the signature when the worker takes a task, before it runs (a
        ``before_process`` middleware underneath)."""
        self._handlers.pre_task = handler
        self._refresh_middleware()

    def set_post_task_handler(self, handler: TaskHandler | None) -> None:
        """Called with the signature when processing of a task ends, however it ended (an
        ``after_process`` middleware underneath: that hook also gets the outcome)."""
        self._handlers.post_task = handler
        self._refresh_middleware()

    def set_pre_consume_handler(self, handler: PreConsumeHandler | None) -> None:
        """Consulted before each fetch; returning False pauses taking new messages."""
        self._pre_consume = handler

    def _refresh_middleware(self) -> None:
        # The server's middleware as it is now, and this worker's Go-style handlers if set.
        handlers = self._handlers
        active = handlers.pre_task is not None or handlers.post_task is not None
        self._middleware = self.server.middleware.including([handlers] if active else [])

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """Run until SIGINT/SIGTERM or ``quit()``: the first signal drains, the second aborts.

        An abort gives every unfinished message back to the queue. A ``def`` task running on
        a thread cannot be stopped in Python, so when an abort leaves one running, ``launch``
        then ends the process (exit status 1): the task must not go on beside the copy that
        another worker may already be running. (``arun`` on your own loop cannot do that;
        there, such a thread runs on until its task returns.)

        Signals can only be handled on the main thread; launched from another thread, the
        worker runs without them and ``quit()`` stops it.
        """
        on_main = threading.current_thread() is threading.main_thread()
        if not on_main:
            log.logger.info("Worker launched off the main thread: no signal handlers; call worker.quit() to stop it")
        asyncio.run(self.arun(install_signal_handlers=on_main and not self.server.config.no_unix_signals))
        busy = self._executor.busy if self._executor is not None else 0
        if self._aborting and busy:
            log.logger.warning(
                "Ending the process: %d task thread(s) were still running; their messages are back on the queue",
                busy,
            )
            logging.shutdown()  # flush the log before leaving without running the threads' ends
            os._exit(1)

    async def arun(self, install_signal_handlers: bool = False) -> None:
        """Run on the current event loop until ``quit()`` (or a signal, if handlers are installed)."""
        self._loop = asyncio.get_running_loop()
        self._started_at = datetime.now(timezone.utc)
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._aborting = False
        self._refresh_middleware()
        if self._quit_requested.is_set():
            self._stopping.set()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._on_signal)
        self._executor = TaskThreads(self.concurrency, thread_name_prefix="machinery-task")
        log.logger.info(
            "Launching a worker: broker=%s backend=%s queue=%s concurrency=%d tag=%s tasks=%s",
            redact_url(self.server.config.broker),
            redact_url(self.server.config.result_backend_url),
            self.queue,
            self.concurrency,
            self.consumer_tag,
            ", ".join(sorted(self.server.tasks)) or "(none)",
        )
        await self._middleware.worker_boot(self)
        consumer = await self._open_consumer()
        scheduler = heartbeat = None
        if consumer is not None:
            heartbeat = asyncio.ensure_future(self._publish_heartbeats())
            if self.periodic:
                # It stops by itself when the worker starts stopping.
                scheduler = asyncio.ensure_future(self.server.periodic.run(self._stopping))
        try:
            if consumer is not None:
                self.started.set()
                await self._consume(consumer)
                await self._drain()
        finally:
            await self._shut_down(consumer, scheduler, heartbeat, install_signal_handlers)

    async def _shut_down(
        self,
        consumer: Consumer | None,
        scheduler: asyncio.Future[None] | None,
        heartbeat: asyncio.Future[None] | None,
        signal_handlers: bool,
    ) -> None:
        assert self._loop is not None and self._stopping is not None and self._executor is not None
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(Exception):  # its record expires by itself anyway
                await self.server.backend.forget_worker(self.consumer_tag)
        if scheduler is not None:
            if self._aborting or not self._stopping.is_set():
                scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)
        if self._running:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        if consumer is not None:
            try:
                await consumer.close()
            except Exception as exc:  # the messages stay taken; another worker reclaims them
                log.logger.warning("could not return taken messages on shutdown: %s", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._middleware.worker_shutdown(self)
        try:
            await self.server.aclose_loop_connections()
        except Exception as exc:  # closing is best effort; nothing is lost by failing
            log.logger.debug("closing the worker's connections failed: %s", exc)
        if signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.remove_signal_handler(sig)
        log.logger.info("Worker quit %s", "abruptly" if self._aborting else "gracefully")

    def quit(self, abort: bool = False) -> None:
        """Ask the worker to stop (from any thread): drain running tasks, or abort them."""
        self._quit_requested.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._request_stop, abort)

    def _on_signal(self) -> None:
        if self._stopping is not None and self._stopping.is_set():
            log.logger.warning("Second signal: stopping now; unfinished tasks go back to the queue")
            self._request_stop(True)
        else:
            log.logger.warning("Signal received: finishing running tasks (signal again to stop now)")
            self._request_stop(False)

    def _request_stop(self, abort: bool) -> None:
        assert self._stopping is not None
        self._stopping.set()
        if abort:
            self._aborting = True
            for task in self._running:
                task.cancel()

    async def _drain(self) -> None:
        while self._running and not self._aborting:
            await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)

    # ------------------------------------------------------------------ heartbeat

    def info(self) -> WorkerInfo:
        """What this worker publishes about itself: who it is, what it runs, what is running now."""
        now = datetime.now(timezone.utc)
        return WorkerInfo(
            tag=self.consumer_tag,
            host=socket.gethostname(),
            pid=os.getpid(),
            queue=self.queue,
            concurrency=self.concurrency,
            tasks=sorted(self.server.tasks),
            started_at=self._started_at or now,
            seen_at=now,
            running=list(self._in_flight.values()),
        )

    async def _publish_heartbeats(self) -> None:
        """Keep this worker's record in the backend fresh (``heartbeat_timeout``), for
        ``machinery inspect``, the dashboard, and ``send --wait`` telling whether anyone runs a task."""
        ttl = self.server.config.heartbeat_timeout
        while True:
            try:
                await self.server.backend.write_worker(self.info(), ttl)
            except UnsupportedOperation as exc:
                log.logger.debug("This worker publishes no heartbeat: %s", exc)
                return
            except Exception as exc:  # the backend may come back; the record just goes stale meanwhile
                log.logger.debug("Publishing this worker's heartbeat failed: %s", exc)
            await asyncio.sleep(ttl / 3)

    # ------------------------------------------------------------------ consuming

    async def _open_consumer(self) -> Consumer | None:
        assert self._stopping is not None
        backoff = Backoff()
        outage = Outage(
            f"Connecting to the broker {redact_url(self.server.config.broker)} to consume {self.queue!r}",
            self._error_handler_report(),
        )
        while not self._stopping.is_set():
            try:
                consumer = await self.server.broker.open_consumer(self.queue, self.consumer_tag, self.concurrency)
            except Exception as exc:
                delay = backoff.next()
                outage.failed(exc, delay)
                await _sleep_unless(self._stopping, delay)
            else:
                outage.over()
                return consumer
        return None

    async def _consume(self, consumer: Consumer) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        stopping = asyncio.ensure_future(self._stopping.wait())
        backoff = Backoff()
        outage = Outage(
            f"Taking messages from {self.queue!r} on {redact_url(self.server.config.broker)}",
            self._error_handler_report(),
        )
        try:
            while not self._stopping.is_set():
                # A slot frees when its task function returns; the outcome is written after,
                # so bound those writers too, or a slow backend would let them pile up.
                free = min(self.concurrency - self._busy, 2 * self.concurrency - len(self._running))
                if free <= 0:
                    self._slot_freed.clear()
                    freed = asyncio.ensure_future(self._slot_freed.wait())
                    await asyncio.wait({stopping, freed}, return_when=asyncio.FIRST_COMPLETED)
                    freed.cancel()
                    continue
                if self._pre_consume is not None and not self._pre_consume(self):
                    await _sleep_unless(self._stopping, PRE_CONSUME_PAUSE)
                    continue
                fetch = asyncio.ensure_future(consumer.fetch(free))
                await asyncio.wait({stopping, fetch}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()  # whatever it took stays with the consumer and is returned on close
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                try:
                    deliveries = fetch.result()
                except Exception as exc:
                    delay = backoff.next()
                    outage.failed(exc, delay)
                    await _sleep_unless(self._stopping, delay)
                    continue
                backoff.reset()
                outage.over()
                for delivery in deliveries:
                    self._busy += 1
                    task = asyncio.ensure_future(self._handle(consumer, delivery, _Slot(self)))
                    self._running.add(task)
                    task.add_done_callback(self._task_done)
        finally:
            stopping.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        assert self._slot_freed is not None
        self._slot_freed.set()

    def _free_slot(self) -> None:
        self._busy -= 1
        assert self._slot_freed is not None
        self._slot_freed.set()

    async def _handle(self, consumer: Consumer, delivery: Delivery, slot: _Slot) -> None:
        try:
            await self._handle_taken(consumer, delivery, slot)
        finally:
            slot.release()

    async def _handle_taken(self, consumer: Consumer, delivery: Delivery, slot: _Slot) -> None:
        try:
            signature = decode_message(delivery.body)
        except MessageDecodeError as exc:
            await self._dead_letter(consumer, delivery, str(exc))
            return
        spec = self.server.tasks.get(signature.name)
        if spec is None:
            slot.release()  # nothing runs: the slot is free for the next message now
            await self._unregistered(consumer, delivery, signature)
            return
        await self.process(signature, spec, slot)
        await self._persist(lambda: consumer.ack(delivery), f"acknowledging {signature.name} {signature.uuid}")
        await self._middleware.after_ack(signature)

    async def _dead_letter(self, consumer: Consumer, delivery: Delivery, reason: str) -> None:
        log.logger.error("Dead-lettering a message from %r: %s", delivery.queue, reason)
        await self._persist(lambda: consumer.dead_letter(delivery, reason), "dead-lettering a message")
        await self._middleware.after_dead_letter(delivery.body, reason)

    async def _unregistered(self, consumer: Consumer, delivery: Delivery, signature: Signature) -> None:
        """A task this worker does not know: someone else's (leave it for them) or a mistake.

        It goes back to the queue after a delay that grows each time this worker meets it
        again, so no worker spins on it and the tasks behind it are not held up; once it has
        kept coming back for ``unregistered_task_timeout`` seconds it is dead-lettered.
        """
        if signature.ignore_when_task_not_registered:
            log.logger.info("Dropping %s %s: not registered here and marked ignorable", signature.name, signature.uuid)
            await self._persist(lambda: consumer.ack(delivery), f"dropping {signature.uuid}")
            await self._middleware.after_ack(signature)
            return
        sighting = self._sighting(signature, delivery.body)
        timeout = self.server.config.unregistered_task_timeout
        if timeout and time.monotonic() - sighting.first_seen >= timeout:
            self._unknown.pop(sighting.key, None)
            reason = (
                f"task {signature.name!r} is not registered on any worker that saw it "
                f"(it kept coming back for {timeout:g} s, seen {sighting.count} times here)"
            )
            await self._dead_letter(consumer, delivery, reason)
            return
        if signature.name not in self._unknown_warned:
            self._unknown_warned.add(signature.name)
            log.logger.warning(
                "Task %r is not registered with this worker; it goes back to the queue for a worker that knows it "
                "(dead-lettered if it keeps coming back for %s; logged once per task name)",
                signature.name,
                f"{timeout:g} s" if timeout else "ever: never",
            )
        delay = min(UNKNOWN_TASK_MAX_DELAY, UNKNOWN_TASK_FIRST_DELAY * 2 ** (sighting.count - 1))
        await self._persist(lambda: consumer.requeue(delivery, delay), f"requeueing {signature.uuid}")
        await self._middleware.after_requeue(signature)

    def _sighting(self, signature: Signature, body: bytes) -> _Sighting:
        """Count one more sighting of this unknown message here (remembered by its UUID)."""
        key = signature.uuid or hashlib.sha1(body).hexdigest()
        sighting = self._unknown.pop(key, None) or _Sighting(key, time.monotonic())
        sighting.count += 1
        self._unknown[key] = sighting
        while len(self._unknown) > UNKNOWN_TASKS_REMEMBERED:
            self._unknown.popitem(last=False)
        return sighting

    # ------------------------------------------------------------------ processing (docs/wire.md §6)

    async def process(self, signature: Signature, spec: TaskSpec, slot: _Slot | None = None) -> Outcome:
        """Run one task and store its outcome (retrying the writes until they succeed).

        ``slot`` is released as soon as the task function returns: the concurrency limit
        bounds running tasks, and the next message can start while this one's outcome is
        being written.
        """
        middleware = self._middleware
        current = asyncio.current_task()
        key = id(current)
        self._in_flight[key] = RunningTask(signature.uuid, signature.name, datetime.now(timezone.utc))
        try:
            await middleware.before_process(signature)
            outcome = await self._run(signature, spec, slot)
            await middleware.before_store(signature, outcome)
            await self._store(signature, outcome)
            await middleware.after_process(signature, outcome)
        finally:
            self._in_flight.pop(key, None)
        return outcome

    async def _run(self, signature: Signature, spec: TaskSpec, slot: _Slot | None) -> Outcome:
        """Convert the arguments, write RECEIVED and STARTED, call the function (§6.1 steps 2-7)."""
        backend = self.server.backend
        what = f"recording the start of {signature.name} {signature.uuid}"
        try:
            values = spec.convert_args(signature.args)
        except ArgumentError as exc:
            if slot is not None:
                slot.release()
            await self._persist(lambda: backend.write_states([_state(signature, RECEIVED)], True), what)
            return Outcome(FAILURE, error=str(exc), exception=exc)
        await self._persist(
            lambda: backend.write_states([_state(signature, RECEIVED), _state(signature, STARTED)], True), what
        )
        started = time.perf_counter()
        try:
            try:
                returned = await spec.call(signature, values, self._executor)
            finally:
                duration = time.perf_counter() - started
                if slot is not None:
                    slot.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.logger.debug("Task %s %s raised", signature.name, signature.uuid, exc_info=True)
            return Outcome(FAILURE, error=error_text(exc), duration=duration, exception=exc)
        try:
            task_results = encode_results(returned)
        except ResultTypeError as exc:
            return Outcome(FAILURE, error=str(exc), duration=duration, exception=exc)
        values = [] if returned is None else list(returned) if isinstance(returned, tuple) else [returned]
        return Outcome(SUCCESS, results=values, duration=duration, task_results=task_results)

    async def _store(self, signature: Signature, outcome: Outcome) -> None:
        """Write the final state (SUCCESS, FAILURE or RETRY), until the backend takes it."""
        results = outcome.task_results if outcome.state == SUCCESS else None
        await self._persist(
            lambda: self.server.backend.set_state(signature, outcome.state, results=results, error=outcome.error),
            f"storing the {outcome.state} of {signature.name} {signature.uuid}",
        )
        if outcome.state == FAILURE:
            if self._error_handler is not None:
                self._error_handler(outcome.exception or RuntimeError(outcome.error))
            else:
                log.logger.error("Task %s %s failed: %s", signature.name, signature.uuid, outcome.error)

    # ------------------------------------------------------------------ helpers

    async def _persist(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a broker or backend write until it succeeds (the server may come back)."""
        return await persist(operation, what, self._error_handler_report())

    def _error_handler_report(self) -> Reporter | None:
        """The error handler, as an outage reporter; None (logging) when there is none."""
        handler = self._error_handler
        if handler is None:
            return None
        return lambda exc, _message: handler(exc)


class TaskThreads(ThreadPoolExecutor):
    """The threads of ``def`` tasks, counting the calls still running: an abort cannot stop them."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def busy(self) -> int:
        """How many task calls are running on a thread now."""
        with self._count_lock:
            return self._running

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            with self._count_lock:
                self._running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self._running -= 1

        return super().submit(counted)


def decode_message(body: bytes) -> Signature:
    """A delivered message as a task; ``MessageDecodeError`` (with the reason) if it is not one."""
    signature = Signature.decode(body)
    if not signature.name:
        raise MessageDecodeError("message names no task (its Name is missing, null or empty)")
    return signature


@dataclass(slots=True)
class _Sighting:
    key: str
    first_seen: float
    count: int = 0


class _Slot:
    """One unit of the worker's concurrency, released exactly once."""

    __slots__ = ("_worker",)

    def __init__(self, worker: Worker) -> None:
        self._worker: Worker | None = worker

    def release(self) -> None:
        if self._worker is not None:
            self._worker._free_slot()
            self._worker = None


def _state(signature: Signature, state: str) -> TaskState:
    return TaskState(signature.uuid, state, signature.name)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
