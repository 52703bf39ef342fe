"""The Worker: take messages, run tasks, write states, retry, send callbacks, shut down cleanly.

Processing follows Go Machinery's ``Process`` (WIRE.md 6) with these differences, all on the
side of losing nothing: a message leaves the broker only after its final state is written;
bad messages go to a dead-letter place instead of stopping or vanishing; argument
conversion failures never stop the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from . import log
from .brokers.base import Consumer, Delivery
from .config import redact_url
from .errors import ArgumentError, MessageDecodeError, ResultTypeError
from .registry import TaskSpec
from .retry import Backoff, RetryTaskLater, fibonacci_next
from .signature import Signature
from .state import FAILURE, RECEIVED, RETRY, STARTED, SUCCESS, TaskState
from .types import Arg, TaskResult, encode_results
from .workflow import complete_chord, was_completed

if TYPE_CHECKING:
    from .server import Server

ErrorHandler = Callable[[BaseException], None]
TaskHandler = Callable[[Signature], None]
PreConsumeHandler = Callable[["Worker"], bool]

UNKNOWN_TASK_MAX_BACKOFF = 5.0

# Whether the chord member being processed arrived with a final state already stored (a
# redelivery after a crash): only such a member may repair a lost chord callback.
_redelivered: contextvars.ContextVar[bool] = contextvars.ContextVar("machinery_redelivered", default=False)


def error_text(exc: BaseException) -> str:
    """The error text stored for a failed task (Go stores the error's message)."""
    return str(exc) or type(exc).__name__


class Worker:
    """Consumes one queue and runs at most ``concurrency`` tasks at a time."""

    def __init__(
        self,
        server: Server,
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
        self._pre_task: TaskHandler | None = None
        self._post_task: TaskHandler | None = None
        self._pre_consume: PreConsumeHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._aborting = False
        self._quit_requested = threading.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0  # slots taken: fetched messages whose task function has not yet returned
        self._slot_freed: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._unknown_delay = 0.0
        self._unknown_warned: set[str] = set()
        self.started = threading.Event()

    # ------------------------------------------------------------------ hooks (WIRE.md 14)

    def set_error_handler(self, handler: ErrorHandler | None) -> None:
        """Called with task failures and broker errors instead of logging them."""
        self._error_handler = handler

    def set_pre_task_handler(self, handler: TaskHandler | None) -> None:
        """Called with the signature just before the task function runs."""
        self._pre_task = handler

    def set_post_task_handler(self, handler: TaskHandler | None) -> None:
        """Called with the signature when processing of a started task ends, however it ended."""
        self._post_task = handler

    def set_pre_consume_handler(self, handler: PreConsumeHandler | None) -> None:
        """Consulted before each fetch; returning False pauses taking new messages."""
        self._pre_consume = handler

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """Run until SIGINT/SIGTERM or ``quit()``: the first signal drains, the second aborts."""
        asyncio.run(self.arun(install_signal_handlers=not self.server.config.no_unix_signals))

    async def arun(self, install_signal_handlers: bool = False) -> None:
        """Run on the current event loop until ``quit()`` (or a signal, if handlers are installed)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._aborting = False
        if self._quit_requested.is_set():
            self._stopping.set()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._on_signal)
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="machinery-task")
        log.logger.info(
            "Launching a worker: broker=%s backend=%s queue=%s concurrency=%d tag=%s tasks=%s",
            redact_url(self.server.config.broker),
            redact_url(self.server.config.result_backend_url),
            self.queue,
            self.concurrency,
            self.consumer_tag,
            ", ".join(sorted(self.server.tasks)) or "(none)",
        )
        consumer = await self._open_consumer()
        scheduler = None
        if consumer is not None and self.periodic:
            # It stops by itself when the worker starts stopping.
            scheduler = asyncio.ensure_future(self.server.periodic.run(self._stopping))
        try:
            if consumer is not None:
                self.started.set()
                await self._consume(consumer)
                await self._drain()
        finally:
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
            try:
                await self.server.aclose_loop_connections()
            except Exception as exc:  # closing is best effort; nothing is lost by failing
                log.logger.debug("closing the worker's connections failed: %s", exc)
            if install_signal_handlers:
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

    # ------------------------------------------------------------------ consuming

    async def _open_consumer(self) -> Consumer | None:
        assert self._stopping is not None
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                return await self.server.broker.open_consumer(self.queue, self.consumer_tag, prefetch=self.concurrency)
            except Exception as exc:
                delay = backoff.next()
                self._report(exc, f"cannot start consuming {self.queue!r}, retrying in {delay:.0f} s")
                await _sleep_unless(self._stopping, delay)
        return None

    async def _consume(self, consumer: Consumer) -> None:
        assert self._stopping is not None and self._slot_freed is not None
        stopping = asyncio.ensure_future(self._stopping.wait())
        poll = max(0.05, self.server.config.redis.normal_tasks_poll_period / 1000)
        backoff = Backoff()
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
                if self._unknown_delay:
                    await _sleep_unless(self._stopping, self._unknown_delay)
                if self._pre_consume is not None and not self._pre_consume(self):
                    await _sleep_unless(self._stopping, poll)
                    continue
                fetch = asyncio.ensure_future(consumer.fetch(free, poll))
                await asyncio.wait({stopping, fetch}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()  # whatever it took stays with the consumer and is returned on close
                    await asyncio.gather(fetch, return_exceptions=True)
                    break
                try:
                    deliveries = fetch.result()
                except Exception as exc:
                    delay = backoff.next()
                    self._report(exc, f"broker error while fetching, retrying in {delay:.0f} s")
                    await _sleep_unless(self._stopping, delay)
                    continue
                backoff.reset()
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
            signature = Signature.decode(delivery.body)
        except MessageDecodeError as exc:
            reason = str(exc)
            log.logger.error("Dead-lettering a message from %r that cannot be decoded: %s", delivery.queue, reason)
            await self._persist(lambda: consumer.dead_letter(delivery, reason))
            return
        spec = self.server.tasks.get(signature.name)
        if spec is None:
            await self._unregistered(consumer, delivery, signature)
            return
        self._unknown_delay = 0.0
        try:
            await self.process(signature, spec, slot)
        except Exception as exc:
            # A task whose outcome could not be recorded goes back to the queue to run again.
            self._report(exc, f"processing {signature.name} {signature.uuid} failed; requeueing it")
            await self._persist(lambda: consumer.requeue(delivery))
            return
        await self._persist(lambda: consumer.ack(delivery))

    async def _unregistered(self, consumer: Consumer, delivery: Delivery, signature: Signature) -> None:
        if signature.ignore_when_task_not_registered:
            log.logger.info("Dropping %s %s: not registered here and marked ignorable", signature.name, signature.uuid)
            await self._persist(lambda: consumer.ack(delivery))
            return
        if signature.name not in self._unknown_warned:
            self._unknown_warned.add(signature.name)
            log.logger.warning(
                "Task %r is not registered with this worker; requeueing it for another worker "
                "and backing off while only unknown tasks arrive (logged once per task name)",
                signature.name,
            )
        await self._persist(lambda: consumer.requeue(delivery))
        self._unknown_delay = min(UNKNOWN_TASK_MAX_BACKOFF, max(0.05, self._unknown_delay * 2))

    # ------------------------------------------------------------------ processing (WIRE.md 6)

    async def process(self, signature: Signature, spec: TaskSpec, slot: _Slot | None = None) -> None:
        """Run one task and record its outcome; raises only if the outcome could not be recorded.

        ``slot`` is released as soon as the task function returns: the concurrency limit
        bounds running tasks, and the next message can start while this one's outcome is
        being written.
        """
        backend = self.server.backend
        _redelivered.set(await was_completed(self.server, signature))
        try:
            values = spec.convert_args(signature.args)
        except ArgumentError as exc:
            await backend.write_states([_state(signature, RECEIVED)], True)
            await self._failed(signature, str(exc), exc)
            return
        await backend.write_states([_state(signature, RECEIVED), _state(signature, STARTED)], True)
        self._call_hook(self._pre_task, signature)
        try:
            record = await self._call(signature, spec, values, slot)
            await record()
        finally:
            self._call_hook(self._post_task, signature)

    async def _call(
        self, signature: Signature, spec: TaskSpec, values: list[object], slot: _Slot | None
    ) -> Callable[[], Awaitable[None]]:
        """Run the task function; return how to record what happened (WIRE.md 6.1 steps 5-7)."""
        try:
            try:
                returned = await spec.call(signature, values, self._executor)
            finally:
                if slot is not None:
                    slot.release()
        except RetryTaskLater as exc:
            return functools.partial(self._retry, signature, exc.delay, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if signature.retry_count > 0:
                signature.retry_count -= 1
                signature.retry_timeout = fibonacci_next(signature.retry_timeout)
                return functools.partial(self._retry, signature, timedelta(seconds=signature.retry_timeout), exc)
            log.logger.debug("Task %s %s raised", signature.name, signature.uuid, exc_info=True)
            return functools.partial(self._failed, signature, error_text(exc), exc)
        try:
            results = encode_results(returned)
        except ResultTypeError as exc:
            return functools.partial(self._failed, signature, str(exc), exc)
        return functools.partial(self._succeeded, signature, results)

    async def _succeeded(self, signature: Signature, results: list[TaskResult]) -> None:
        await self.server.backend.set_state(signature, SUCCESS, results=results)
        for callback in signature.on_success or ():
            if not signature.immutable:  # Go consults the finished task's flag (WIRE.md 6.3)
                callback.args = [*(callback.args or ()), *(Arg.from_wire(r.type, r.value) for r in results)]
            await self.server.asend_task(callback)
        await complete_chord(self.server, signature, _redelivered.get())

    async def _failed(self, signature: Signature, error: str, exc: BaseException | None = None) -> None:
        await self.server.backend.set_state(signature, FAILURE, error=error)
        self._report(exc or RuntimeError(error), f"Task {signature.name} {signature.uuid} failed: {error}")
        for callback in signature.on_error or ():
            callback.args = [Arg("string", error), *(callback.args or ())]
            await self.server.asend_task(callback)
        # Go evaluates chords only after successes, so a chord whose last member fails hangs.
        await complete_chord(self.server, signature, _redelivered.get())

    async def _retry(self, signature: Signature, delay: timedelta, exc: BaseException) -> None:
        await self.server.backend.set_state(signature, RETRY)
        signature.eta = datetime.now(timezone.utc) + delay
        log.logger.info(
            "Task %s %s will retry in %.3g s: %s",
            signature.name,
            signature.uuid,
            delay.total_seconds(),
            error_text(exc),
        )
        await self.server.asend_task(signature)

    # ------------------------------------------------------------------ helpers

    async def _persist(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Run a broker or backend write until it succeeds (the server may come back) or we abort."""
        backoff = Backoff()
        while True:
            try:
                await operation()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._aborting:
                    raise
                delay = backoff.next()
                self._report(exc, f"broker write failed, retrying in {delay:.0f} s")
                await asyncio.sleep(delay)

    def _call_hook(self, hook: TaskHandler | None, signature: Signature) -> None:
        # A failing hook is the application's bug, not the task's: log it and carry on, or the
        # message would be requeued and run again forever.
        if hook is not None:
            try:
                hook(signature)
            except Exception:
                log.logger.exception("A task handler raised for %s %s", signature.name, signature.uuid)

    def _report(self, exc: BaseException, message: str) -> None:
        if self._error_handler is not None:
            self._error_handler(exc)
        else:
            log.logger.error("%s (%s: %s)", message, type(exc).__name__, exc)


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
