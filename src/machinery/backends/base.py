"""The result-backend seam: task states, group metadata, the chord trigger, and waiting.

Writes follow docs/wire.md §5: PENDING carries the task name and creation time; every later state
keeps the stored creation time; every write refreshes the expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from .. import log
from .._backoff import Backoff
from .._loops import Waiters
from ..config import Config, redact_url
from ..errors import BrokerConnectionError, MessageDecodeError, TaskNotFoundError, UnsupportedOperation
from ..signature import Signature
from ..state import PENDING, GroupMeta, TaskState, WorkerInfo, utcnow
from ..types import TaskResult

#: The UUID ``ping`` reads: no task has it (task UUIDs start ``task_`` or are Go's UUIDs).
PING_UUID = "machinery_ping"


class Backend(ABC):
    """Stores task states and group metadata.

    Every method is a coroutine; the sync face is ``AsyncResult``'s and the Server's.
    """

    #: False for the results-off backend: nothing written can be read back, so whatever needs
    #: the members' states (a chord) is refused when sent.
    stores_results: ClassVar[bool] = True
    #: True where one ``write_states`` call is stored all at once (one script, one transaction,
    #: one lock), so that no reader can see a state of it that a later one replaces; the worker
    #: then writes STARTED without the RECEIVED that nobody could observe. False (the safe
    #: default) where states are a stream a reader sees one by one (RabbitMQ's state queues).
    writes_batches_atomically: ClassVar[bool] = False
    #: True where this driver's connections need nothing from their event loop between calls
    #: (no heartbeats to answer, no reconnection running in the background): sync calls may then
    #: run on a loop of the calling thread that sleeps between them (``_sync.run_sync``).
    idle_loop_ok: ClassVar[bool] = False
    #: How often ``await_state`` re-reads the store when no notification can reach it.
    poll_interval: float = 0.05
    #: Appended to the "no state" message of ``TaskNotFoundError``: other reasons this store has.
    unknown_state_hint: str = ""
    #: What an unreachable store looks like in this driver's exceptions: waiting rides these
    #: out (drivers add their client library's connection errors).
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (
        BrokerConnectionError,
        ConnectionError,
        OSError,
        asyncio.TimeoutError,
    )

    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url
        self._waiters = Waiters()

    @property
    def ttl(self) -> int:
        return self.config.results_ttl

    # ------------------------------------------------------------------ writes

    async def set_pending(self, signatures: Sequence[Signature]) -> None:
        """Write PENDING for signatures about to be published (one round trip where possible)."""
        await self.write_states(pending_states(signatures), False)

    async def set_state(
        self, signature: Signature, state: str, results: list[TaskResult] | None = None, error: str = ""
    ) -> None:
        """Write a worker-side state (RECEIVED, STARTED, RETRY, SUCCESS, FAILURE)."""
        await self.write_states([TaskState(signature.uuid, state, signature.name, results, error)], True)

    @abstractmethod
    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        """Store each state under its task UUID, in order, refreshing the expiry.

        With ``keep_created`` the stored CreatedAt survives (docs/wire.md §5). Completed states
        must wake anyone in ``await_state`` for that UUID.
        """

    # ------------------------------------------------------------------ reads

    @abstractmethod
    async def get_state(self, task_uuid: str) -> TaskState | None:
        """The stored state of a task, or None if there is none (never sent, or expired)."""

    async def await_state(self, task_uuid: str, timeout: float | None, missing_grace: float | None = None) -> TaskState:
        """Wait until the task is completed and return its state.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first, and ``TaskNotFoundError``
        when ``missing_grace`` is given and no state at all has appeared within it (the UUID
        was never sent here, or its result expired). Wakes on notifications from writers where
        the backend has them (a notification may carry the completed state itself), and
        otherwise re-reads every ``poll_interval`` seconds (for states written by Go workers,
        which notify nobody). An unreachable store is waited out until the deadline: the first
        failure is logged, and reads are retried with a back-off.
        """
        wait = _Wait(self, task_uuid, timeout, missing_grace)
        async with self._waiters.watch(task_uuid) as waiter:
            handle = await self._subscribe(task_uuid)
            try:
                state = await wait.read()
                while state is None or not state.is_completed():
                    seconds = wait.next_pause(state, self._poll_interval(handle))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waiter.event.wait(), seconds)
                    waiter.event.clear()
                    handle = await self._resubscribe(task_uuid, handle)
                    delivered, waiter.state = waiter.state, None
                    state = self._notified_state(task_uuid, delivered) if delivered else None
                    if state is None or not state.is_completed():
                        state = await wait.read()
                return state
            finally:
                await self._unsubscribe(task_uuid, handle)

    async def _subscribe(self, task_uuid: str) -> Any:
        """Start listening for completions of ``task_uuid`` written by other processes, where the
        backend can; returns a handle for ``_unsubscribe`` (failures mean polling, never an error)."""
        return None

    async def _resubscribe(self, task_uuid: str, handle: Any) -> Any:
        """Listen again if the listening was lost (after a waiter woke); returns the handle."""
        return handle

    async def _unsubscribe(self, task_uuid: str, handle: Any) -> None:
        """Undo ``_subscribe``."""

    def _poll_interval(self, handle: Any) -> float:
        """Seconds between re-reads while waiting (long where completions are notified)."""
        return self.poll_interval

    def _notified_state(self, task_uuid: str, body: bytes) -> TaskState | None:
        """The state a notification carried, or None if it is not one."""
        try:
            return TaskState.decode(body)
        except MessageDecodeError:
            return None

    # ------------------------------------------------------------------ groups

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Write the metadata of a new group (members in group order)."""
        await self.write_group_meta(GroupMeta(group_uuid, list(task_uuids), created_at=utcnow()))

    @abstractmethod
    async def write_group_meta(self, meta: GroupMeta) -> None:
        """Store group metadata under its group UUID with the results' expiry."""

    @abstractmethod
    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        """The stored group metadata, or None."""

    @abstractmethod
    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        """The stored states of several tasks, in the given order."""

    async def group_task_states(self, group_uuid: str) -> list[TaskState | None]:
        """The members' states in group order (None for a member with no stored state)."""
        meta = await self.get_group_meta(group_uuid)
        if meta is None:
            return []
        return await self.get_states(meta.task_uuids)

    async def group_completed(self, group_uuid: str, task_count: int) -> bool:
        """True when ``task_count`` members have completed (SUCCESS or FAILURE)."""
        states = await self.group_task_states(group_uuid)
        return sum(1 for s in states if s is not None and s.is_completed()) >= task_count

    @abstractmethod
    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        """Atomically flip the group's ``ChordTriggered``; True for exactly one caller.

        ``task_count`` is the group's size as its members carry it (``GroupTaskCount``), for
        stores that decide on the members' states themselves (RabbitMQ's group queue).
        """

    @abstractmethod
    async def purge_state(self, task_uuid: str) -> None:
        """Forget a task's state."""

    @abstractmethod
    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget a group's metadata."""

    # ------------------------------------------------------------------ beside the state

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        """Store ``value`` as the task's ``name`` (``traceback``, ``progress``), beside its state
        and expiring with it, never inside Go's TaskState; ``UnsupportedOperation`` if the store
        keeps nothing beside states."""
        raise UnsupportedOperation(f"{type(self).__name__} keeps nothing beside task states")

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        """The task's stored ``name``, or None."""
        raise UnsupportedOperation(f"{type(self).__name__} keeps nothing beside task states")

    # ------------------------------------------------------------------ revocations

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        """Record that ``task_uuid`` must not run (``terminate``: stop it if it runs); the
        record expires with the results. Workers learn it through ``revocations``."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot record revocations")

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        """Every live revocation (task UUID -> terminate) with a version, or None when the
        version is still ``since`` (a cheap look for the workers' poll)."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot record revocations")

    # ------------------------------------------------------------------ workers

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Record a live worker's heartbeat; it counts as alive for ``ttl`` seconds.

        Raises ``UnsupportedOperation`` where the store cannot list what it keeps.
        """
        raise UnsupportedOperation(f"{type(self).__name__} keeps no record of workers")

    async def forget_worker(self, tag: str) -> None:
        """Remove a worker's record (it stopped)."""

    async def get_workers(self) -> list[WorkerInfo]:
        """The workers whose heartbeat has not expired, by tag; ``UnsupportedOperation`` where
        the store cannot tell."""
        raise UnsupportedOperation(f"{type(self).__name__} keeps no record of workers")

    # ------------------------------------------------------------------ operations

    async def ping(self) -> None:
        """Return once the store has answered a round trip; raise its connection error if not.

        The base reads the state of a UUID no task has (one read, on every store); drivers
        with a cheaper no-op round trip override it."""
        await self.get_state(PING_UUID)

    async def close(self) -> None:
        """Release connections held by this backend."""

    async def close_loop_connections(self) -> None:
        """Close the connections bound to the running event loop; see ``Broker``'s."""


class _Wait:
    """The bookkeeping of one ``await_state``: its deadline, its grace, and outages on the way."""

    def __init__(self, backend: Backend, task_uuid: str, timeout: float | None, missing_grace: float | None) -> None:
        self._backend = backend
        self._uuid = task_uuid
        self._timeout = timeout
        now = time.monotonic()
        self._deadline = None if timeout is None else now + timeout
        self._grace_ends = None if missing_grace is None else now + missing_grace
        self._backoff = Backoff(cap=5.0, unit=0.5)
        self._outage = False

    async def read(self) -> TaskState | None:
        """The stored state; None while the store cannot be reached (the first failure is logged)."""
        try:
            state = await self._backend.get_state(self._uuid)
        except self._backend.connection_errors as exc:
            if not self._outage:
                log.logger.warning(
                    "Waiting for %s: the result backend %s is unreachable (%s: %s); still waiting",
                    self._uuid,
                    redact_url(self._backend.url),
                    type(exc).__name__,
                    exc,
                )
            self._outage = True
            return None
        if self._outage:
            log.logger.info("Waiting for %s: the result backend answers again", self._uuid)
            self._outage = False
            self._backoff.reset()
        if state is not None:
            self._grace_ends = None  # it exists: wait for it however long the timeout allows
        return state

    def next_pause(self, state: TaskState | None, poll_interval: float) -> float:
        """Seconds to sleep before looking again; raises when the wait is over."""
        now = time.monotonic()
        if state is None and not self._outage and self._grace_ends is not None and now >= self._grace_ends:
            raise TaskNotFoundError(
                self._uuid,
                f"no state for task {self._uuid} in {redact_url(self._backend.url)}: it was never sent there, "
                f"or its result expired (results live {self._backend.ttl} s){self._backend.unknown_state_hint}",
            )
        pause = max(0.05, self._backoff.next()) if self._outage else poll_interval
        if self._grace_ends is not None:
            pause = min(pause, max(0.01, self._grace_ends - now))
        if self._deadline is not None:
            left = self._deadline - now
            if left <= 0:
                raise TimeoutError(f"task {self._uuid} did not complete within {self._timeout:g} s")
            pause = min(pause, left)
        return pause


def per_task(states: Sequence[TaskState]) -> list[list[TaskState]]:
    """``states`` by task, each task's in the order given: a driver may write different tasks'
    states at once, but one task's only one after another, or an earlier one may land last."""
    by_uuid: dict[str, list[TaskState]] = {}
    for state in states:
        by_uuid.setdefault(state.task_uuid, []).append(state)
    return list(by_uuid.values())


def pending_states(signatures: Sequence[Signature]) -> list[TaskState]:
    """The PENDING state of each signature about to be published (Go's SetStatePending)."""
    now = utcnow()
    return [TaskState(s.uuid, PENDING, s.name, created_at=now) for s in signatures]


class PollSchedule:
    """Re-read intervals for one wait on a store that cannot notify (memcached, MongoDB
    without a replica set): fast at first, since most tasks finish soon, then every 0.5 s."""

    __slots__ = ("_next",)

    FIRST = 0.01
    LAST = 0.5

    def __init__(self) -> None:
        self._next = self.FIRST

    def next(self) -> float:
        """The pause before the next read; each is half as long again, up to ``LAST``."""
        current = self._next
        self._next = min(self.LAST, current * 1.5)
        return current


def decode_workers(records: Sequence[bytes | str]) -> list[WorkerInfo]:
    """Worker records as stored, decoded; one that does not decode is skipped (and logged)."""
    workers = []
    for record in records:
        try:
            workers.append(WorkerInfo.decode(record))
        except MessageDecodeError as exc:
            log.logger.warning("Ignoring a worker record that does not decode: %s", exc)
    return sorted(workers, key=lambda w: w.tag)
