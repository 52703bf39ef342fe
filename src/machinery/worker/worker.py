"""The Worker: take messages as fast as it can run them, publish a heartbeat, shut down cleanly.

A worker consumes one queue and runs at most ``concurrency`` tasks at once; each message it
takes is settled by its ``MessageHandler`` (``processing``), which runs Go Machinery's
``Process`` (docs/wire.md §6) with Go's retries, callbacks and chord completion as built-in
middleware. The first SIGINT/SIGTERM lets running tasks finish; the second gives every
unfinished message back at once (and, under ``launch``, ends the process if a ``def`` task's
thread is still running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Protocol

from .. import log
from .._backoff import Backoff, Outage
from ..backends.base import Backend
from ..brokers.base import Broker, Consumer, Delivery
from ..config import Config, redact_url
from ..controls import Limits
from ..errors import ConfigError, TaskRevoked, UnsupportedOperation
from ..locks.base import Lock
from ..middleware import HandlerAdapter, MiddlewareStack
from ..periodic import Scheduler
from ..registry import TaskSpec
from ..signature import Signature
from ..state import WorkerInfo
from .execution import Execution
from .pool import ProcessPool
from .processing import ErrorHandler, MessageHandler, reporter
from .threads import TaskThreads

TaskHandler = Callable[[Signature], None]
PreConsumeHandler = Callable[["Worker"], bool]

#: Seconds between two looks at the pre-consume handler while it says no.
PRE_CONSUME_PAUSE = 0.2
#: Seconds between two looks for new revocations: a revocation reaches every worker within it.
REVOCATION_POLL = 0.5
POOLS = ("threads", "processes")


class WorkerHost(Protocol):
    """What a worker needs of the Server it works for (a ``Server`` is one)."""

    config: Config
    broker: Broker
    backend: Backend
    middleware: MiddlewareStack
    periodic: Scheduler

    @property
    def tasks(self) -> Mapping[str, TaskSpec]: ...

    @property
    def lock(self) -> Lock: ...

    async def aclose_loop_connections(self) -> None: ...


class Worker:
    """Consumes one queue and runs at most ``concurrency`` tasks at a time."""

    def __init__(
        self,
        server: WorkerHost,
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
    ):
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool != "processes" and (max_tasks_per_child or max_memory_per_child):
            raise ConfigError(
                'max_tasks_per_child and max_memory_per_child recycle child processes: they need pool="processes"'
            )
        self.server = server
        self.periodic = periodic  # run the server's periodic scheduler beside consuming
        self.pool = pool
        self.default_limits = Limits(soft=soft_time_limit, hard=time_limit)
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child
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
        self._handler: MessageHandler | None = None
        self._pool: ProcessPool | None = None
        self._revocations_version = 0
        self.started = threading.Event()
        self._started_at: datetime | None = None

    # ------------------------------------------------------------------ hooks (docs/wire.md §14)

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """Called with task failures and broker errors instead of logging them."""
        self._error_handler = handler
        if self._handler is not None:
            self._handler.error_handler = handler

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
        if self._handler is not None:  # (a handler set while the worker runs applies at once)
            self._handler.middleware = self._middleware

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
        consumer = scheduler = heartbeat = None
        try:
            await self._start_pool()
            server = self.server
            self._handler = MessageHandler(
                server.config,
                server.backend,
                lambda: server.lock,
                server.tasks,
                self._middleware,
                Execution(self._executor, self._pool),
                self.default_limits,
                self._error_handler,
            )
            log.logger.info(
                "Launching a worker: broker=%s backend=%s queue=%s concurrency=%d pool=%s tag=%s tasks=%s",
                redact_url(server.config.broker),
                redact_url(server.config.result_backend_url),
                self.queue,
                self.concurrency,
                self.pool,
                self.consumer_tag,
                ", ".join(sorted(server.tasks)) or "(none)",
            )
            await self._middleware.worker_boot(self)
            consumer = await self._open_consumer()
            if consumer is not None:
                await self._follow_revocations()  # the revocations made so far, before the first message
                heartbeat = asyncio.ensure_future(self._keep_up())
                if self.periodic:
                    # It stops by itself when the worker starts stopping.
                    scheduler = asyncio.ensure_future(server.periodic.run(self._stopping))
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
        if self._pool is not None:
            await self._pool.close(kill=self._aborting)
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
            running=list(self._handler.in_flight.values()) if self._handler is not None else [],
            processed=self._handler.processed if self._handler is not None else 0,
        )

    async def _keep_up(self) -> None:
        """While the worker runs: follow revocations (twice a second) and keep its heartbeat
        record fresh (every ``heartbeat_timeout / 3``)."""
        beat_every = self.server.config.heartbeat_timeout / 3
        heartbeat_due = 0.0
        publishing = following = True
        while publishing or following:
            if following:
                following = await self._follow_revocations()
            if publishing and time.monotonic() >= heartbeat_due:
                publishing = await self._publish_heartbeat()
                heartbeat_due = time.monotonic() + beat_every
            await asyncio.sleep(REVOCATION_POLL)

    async def _publish_heartbeat(self) -> bool:
        """Write this worker's record (for ``machinery inspect``, the dashboard, and ``send
        --wait`` telling whether anyone runs a task); False where the backend keeps none."""
        try:
            await self.server.backend.write_worker(self.info(), self.server.config.heartbeat_timeout)
        except UnsupportedOperation as exc:
            log.logger.debug("This worker publishes no heartbeat: %s", exc)
            return False
        except Exception as exc:  # the backend may come back; the record just goes stale meanwhile
            log.logger.debug("Publishing this worker's heartbeat failed: %s", exc)
        return True

    async def _follow_revocations(self) -> bool:
        """Learn new revocations; stop the running tasks revoked with ``terminate``. False
        where the backend records none (nothing to follow)."""
        assert self._handler is not None
        try:
            found = await self.server.backend.revocations(self._revocations_version)
        except UnsupportedOperation:
            return False
        except Exception as exc:  # the backend may come back; the next look will tell
            log.logger.debug("Reading revocations failed: %s", exc)
            return True
        if found is None:
            return True
        self._revocations_version, revoked = found
        previous, self._handler.revoked = self._handler.revoked, revoked
        for task_uuid, terminate in revoked.items():
            if terminate and not previous.get(task_uuid) and self._handler.execution.stop(task_uuid, TaskRevoked()):
                log.logger.warning("Stopped %s: it was revoked", task_uuid)
        return True

    async def _start_pool(self) -> None:
        """The process pool, when ``pool="processes"``; with threads, say what limits cannot do."""
        self._pool = None
        if self.pool == "processes":
            self._pool = ProcessPool(self.concurrency, self.max_tasks_per_child, self.max_memory_per_child)
            await self._pool.start(self.server.tasks)
            return
        limited = sorted(
            name
            for name, spec in self.server.tasks.items()
            if not spec.is_async and (spec.options.time_limit or spec.options.soft_time_limit or self.default_limits)
        )
        if limited:
            log.logger.warning(
                "Time limits on def tasks (%s) need pool='processes' (--pool processes): on threads a soft limit "
                "cannot be delivered, and at the hard limit the worker records the failure but the thread runs on",
                ", ".join(limited),
            )

    # ------------------------------------------------------------------ consuming

    async def _open_consumer(self) -> Consumer | None:
        assert self._stopping is not None
        backoff = Backoff()
        outage = Outage(
            f"Connecting to the broker {redact_url(self.server.config.broker)} to consume {self.queue!r}",
            reporter(self._error_handler),
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
            reporter(self._error_handler),
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
                    task = asyncio.ensure_future(self._handle(consumer, delivery, _WorkerSlot(self)))
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

    async def _handle(self, consumer: Consumer, delivery: Delivery, slot: _WorkerSlot) -> None:
        assert self._handler is not None
        try:
            await self._handler.handle(consumer, delivery, slot)
        finally:
            slot.release()


class _WorkerSlot:
    """One unit of the worker's concurrency, released exactly once."""

    __slots__ = ("_worker",)

    def __init__(self, worker: Worker) -> None:
        self._worker: Worker | None = worker

    def release(self) -> None:
        if self._worker is not None:
            self._worker._free_slot()
            self._worker = None


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
