"""What happens to one message a worker took (docs/wire.md §6, with our differences):

* a message that is not a task (undecodable, or naming no task) is dead-lettered with why;
* a task this worker does not know goes back to the queue for one that knows it, after a delay
  that grows each time it comes back here, and is dead-lettered after
  ``unregistered_task_timeout``;
* a revoked task is not run: it passes through the middleware as a FAILURE "revoked";
* a task over its rate limit books the next free turn across the cluster and waits in the
  broker until then (``requeue`` with a delay), holding no slot; when it comes back it runs;
* a registered task runs through the middleware (``before_process``, RECEIVED, STARTED, the
  call within its time limits, ``before_store``, the final state, ``after_process``), and its
  message is acked once all of that is written. Those writes are retried while the message
  stays held, so a task that has run is never run again because the backend was away.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol, TypeVar

from .. import log
from .._backoff import Reporter, persist
from ..backends.base import Backend
from ..brokers.base import Consumer, Delivery
from ..config import Config
from ..controls import Limits, limits_of
from ..errors import ArgumentError, MessageDecodeError, ResultTypeError, TaskRevoked, UnsupportedOperation
from ..locks.base import Lock
from ..middleware import MiddlewareStack, Outcome
from ..registry import TaskSpec
from ..signature import Signature
from ..state import FAILURE, RECEIVED, STARTED, SUCCESS, TRACEBACK, RunningTask, TaskState
from ..types import encode_results
from .execution import Execution
from .progress import ProgressWriter
from .tracebacks import last_frames, traceback_of

T = TypeVar("T")

ErrorHandler = Callable[[BaseException], None]

#: A message of a task this worker does not know goes back to the queue for this long the
#: first time it is seen here, twice as long each time after, up to the maximum: it is left
#: for a worker that knows it without this one spinning on it, and nothing else waits.
UNKNOWN_TASK_FIRST_DELAY = 1.0
UNKNOWN_TASK_MAX_DELAY = 30.0
#: Unknown messages remembered (first seen, times seen) per worker.
UNKNOWN_TASKS_REMEMBERED = 10_000
#: A deferred rate-limited task's booking is kept this long for it to come back to (a task
#: that never does, e.g. revoked, leaves only this small key to expire).
RATE_BOOKING_KEPT = 7 * 86400.0
BOOKED = "booked"
#: Frames of a failed task's traceback that its log line shows.


class Slot(Protocol):
    """One unit of the worker's concurrency: released when the task function returns."""

    def release(self) -> None: ...


def error_text(exc: BaseException) -> str:
    """The error text stored for a failed task (Go stores the error's message)."""
    return str(exc) or type(exc).__name__


def decode_message(body: bytes) -> Signature:
    """A delivered message as a task; ``MessageDecodeError`` (with the reason) if it is not one."""
    signature = Signature.decode(body)
    if not signature.name:
        raise MessageDecodeError("message names no task (its Name is missing, null or empty)")
    return signature


class MessageHandler:
    """Settles the messages of one running worker; ``middleware`` may be replaced while it runs."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        lock: Callable[[], Lock],
        tasks: Mapping[str, TaskSpec],
        middleware: MiddlewareStack,
        execution: Execution,
        default_limits: Limits,
        error_handler: ErrorHandler | None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.lock = lock
        self.tasks = tasks
        self.middleware = middleware
        self.execution = execution
        self.default_limits = default_limits
        self.error_handler = error_handler
        self.in_flight: dict[int, RunningTask] = {}  # by id() of the asyncio task processing it
        self.processed = 0  # tasks processed (their outcome stored), for the heartbeat
        #: Task UUID -> stop it if it runs: the worker's view of the revocations (refreshed by it).
        self.revoked: dict[str, bool] = {}
        self._unknown: OrderedDict[str, _Sighting] = OrderedDict()
        self._unknown_warned: set[str] = set()

    async def handle(self, consumer: Consumer, delivery: Delivery, slot: Slot) -> None:
        """Settle one message: dead letter, requeue for later, or run it and ack it (or, after a
        final failure with ``stop_task_deletion_on_error``, leave it to the queue's redrive)."""
        try:
            signature = decode_message(delivery.body)
        except MessageDecodeError as exc:
            await self._dead_letter(consumer, delivery, str(exc))
            return
        spec = self.tasks.get(signature.name)
        if spec is None:
            slot.release()  # nothing runs: the slot is free for the next message now
            await self._unregistered(consumer, delivery, signature)
            return
        if signature.uuid in self.revoked:
            await self.process(signature, spec, slot, forced=Outcome(FAILURE, error="revoked", exception=TaskRevoked()))
        else:
            wait = await self._turn(signature, spec) if spec.options.rate_limit is not None else 0.0
            if wait > 0:
                slot.release()
                await self.persist(lambda: consumer.requeue(delivery, wait), f"deferring {signature.uuid}")
                await self.middleware.after_requeue(signature)
                return
            outcome = await self.process(signature, spec, slot)
            if outcome.state == FAILURE and signature.stop_task_deletion_on_error:
                left = await self.persist(lambda: consumer.leave_for_redrive(delivery), f"keeping {signature.uuid}")
                if left:
                    return
        await self.persist(lambda: consumer.ack(delivery), f"acknowledging {signature.name} {signature.uuid}")
        await self.middleware.after_ack(signature)

    # ------------------------------------------------------------------ messages that do not run

    async def _dead_letter(self, consumer: Consumer, delivery: Delivery, reason: str) -> None:
        log.logger.error("Dead-lettering a message from %r: %s", delivery.queue, reason)
        await self.persist(lambda: consumer.dead_letter(delivery, reason), "dead-lettering a message")
        await self.middleware.after_dead_letter(delivery.body, reason)

    async def _unregistered(self, consumer: Consumer, delivery: Delivery, signature: Signature) -> None:
        """A task this worker does not know: someone else's (leave it for them) or a mistake.

        It goes back to the queue after a delay that grows each time this worker meets it
        again, so no worker spins on it and the tasks behind it are not held up; once it has
        kept coming back for ``unregistered_task_timeout`` seconds it is dead-lettered.
        """
        if signature.ignore_when_task_not_registered:
            log.logger.info("Dropping %s %s: not registered here and marked ignorable", signature.name, signature.uuid)
            await self.persist(lambda: consumer.ack(delivery), f"dropping {signature.uuid}")
            await self.middleware.after_ack(signature)
            return
        sighting = self._sighting(signature, delivery.body)
        timeout = self.config.unregistered_task_timeout
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
        await self.persist(lambda: consumer.requeue(delivery, delay), f"requeueing {signature.uuid}")
        await self.middleware.after_requeue(signature)

    async def _turn(self, signature: Signature, spec: TaskSpec) -> float:
        """Seconds until this task's turn under its rate limit (0: now), booked in the lock
        shared by the cluster. A deferred message may come back to any worker: the booking is
        marked in the lock under the task's UUID, so whoever takes it runs it, with no new turn."""
        rate = spec.options.rate_limit
        assert rate is not None
        lock = self.lock()
        marker = f"machinery_rate_booked_{signature.uuid}"
        what = f"taking a turn for {spec.name} (rate limit)"
        if await self.persist(lambda: lock.claim(marker, BOOKED, RATE_BOOKING_KEPT), what) is not None:
            await self.persist(lambda: lock.release(marker, BOOKED), what)
            return 0.0  # it comes back for the turn it booked
        burst = max(1, int(rate.count / rate.per))  # at most one second's worth at once
        wait = await self.persist(lambda: lock.take_turn(f"machinery_rate_{spec.name}", rate.interval, burst), what)
        if wait <= 0:
            await self.persist(lambda: lock.release(marker, BOOKED), what)
        return wait

    def _sighting(self, signature: Signature, body: bytes) -> _Sighting:
        """Count one more sighting of this unknown message here (remembered by its UUID)."""
        key = signature.uuid or hashlib.sha1(body).hexdigest()
        sighting = self._unknown.pop(key, None) or _Sighting(key, time.monotonic())
        sighting.count += 1
        self._unknown[key] = sighting
        while len(self._unknown) > UNKNOWN_TASKS_REMEMBERED:
            self._unknown.popitem(last=False)
        return sighting

    # ------------------------------------------------------------------ running a task

    async def process(
        self, signature: Signature, spec: TaskSpec, slot: Slot | None = None, forced: Outcome | None = None
    ) -> Outcome:
        """Run one task and store its outcome (retrying the writes until they succeed).

        ``slot`` is released as soon as the task function returns: the concurrency limit
        bounds running tasks, and the next message can start while this one's outcome is
        being written. A ``forced`` outcome (a revoked task) is stored without running it.
        """
        middleware = self.middleware
        key = id(asyncio.current_task())
        self.in_flight[key] = RunningTask(signature.uuid, signature.name, datetime.now(timezone.utc))
        try:
            await middleware.before_process(signature)
            if forced is not None:
                if slot is not None:
                    slot.release()
                outcome = forced
            else:
                outcome = await self._run(signature, spec, slot)
            await middleware.before_store(signature, outcome)
            await self._store(signature, outcome)
            await middleware.after_process(signature, outcome)
            self.processed += 1
        finally:
            self.in_flight.pop(key, None)
        return outcome

    async def _run(self, signature: Signature, spec: TaskSpec, slot: Slot | None) -> Outcome:
        """Convert the arguments, write RECEIVED and STARTED, call the function (§6.1 steps 2-7)."""
        backend = self.backend
        what = f"recording the start of {signature.name} {signature.uuid}"
        try:
            values = spec.convert_args(signature.args)
        except ArgumentError as exc:
            if slot is not None:
                slot.release()
            await self.persist(lambda: backend.write_states([_state(signature, RECEIVED)], True), what)
            return Outcome(FAILURE, error=str(exc), exception=exc)
        # Go writes RECEIVED, then STARTED. Where both would be stored at once, no reader could
        # ever see RECEIVED, so only STARTED is written (half the work of this step).
        if backend.writes_batches_atomically:
            starting = [_state(signature, STARTED)]
        else:
            starting = [_state(signature, RECEIVED), _state(signature, STARTED)]
        await self.persist(lambda: backend.write_states(starting, True), what)
        limits = limits_of(signature, spec.options, self.default_limits)
        progress = ProgressWriter(self.backend, signature.uuid) if spec.wants_context else None
        started = time.perf_counter()
        try:
            try:
                returned = await self.execution.run(spec, signature, values, limits, progress)
            finally:
                duration = time.perf_counter() - started
                if slot is not None:
                    slot.release()
                if progress is not None:
                    await progress.flushed()
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
        """Write the final state (SUCCESS, FAILURE or RETRY), until the backend takes it; a
        failure's traceback first, beside it, so that whoever the state wakes finds it."""
        results = outcome.task_results if outcome.state == SUCCESS else None
        trace = traceback_of(outcome.exception) if outcome.state == FAILURE else None
        if trace:
            await self._annotate(signature, TRACEBACK, trace)
        await self.persist(
            lambda: self.backend.set_state(signature, outcome.state, results=results, error=outcome.error),
            f"storing the {outcome.state} of {signature.name} {signature.uuid}",
        )
        if outcome.state == FAILURE:
            if self.error_handler is not None:
                self.error_handler(outcome.exception or RuntimeError(outcome.error))
            else:
                frames = last_frames(trace) if trace else ""
                log.logger.error("Task %s %s failed: %s%s", signature.name, signature.uuid, outcome.error, frames)

    async def _annotate(self, signature: Signature, name: str, value: str) -> None:
        async def write() -> None:
            try:
                await self.backend.write_annotation(signature.uuid, name, value)
            except UnsupportedOperation:
                return  # this backend keeps nothing beside states

        await self.persist(write, f"storing the {name} of {signature.name} {signature.uuid}")

    # ------------------------------------------------------------------ writes that must happen

    async def persist(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a broker or backend write until it succeeds (the server may come back)."""
        return await persist(operation, what, reporter(self.error_handler))


def reporter(handler: ErrorHandler | None) -> Reporter | None:
    """A worker's error handler as an outage reporter; None (logging) when there is none."""
    if handler is None:
        return None
    return lambda exc, _message: handler(exc)


@dataclass(slots=True)
class _Sighting:
    key: str
    first_seen: float
    count: int = 0


def _state(signature: Signature, state: str) -> TaskState:
    return TaskState(signature.uuid, state, signature.name)
