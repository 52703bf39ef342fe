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

from .._loops import Waiters
from ..config import Config
from ..signature import Signature
from ..state import COMPLETED_STATES, PENDING, GroupMeta, TaskState, utcnow
from ..types import TaskResult


class Backend(ABC):
    """Stores task states and group metadata.

    Every method is a coroutine; the sync face is ``AsyncResult``'s and the Server's.
    """

    #: How often ``await_state`` re-reads the store when no notification can reach it.
    poll_interval: float = 0.05

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
        now = utcnow()
        await self.write_states([TaskState(s.uuid, PENDING, s.name, created_at=now) for s in signatures], False)

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

    async def await_state(self, task_uuid: str, timeout: float | None) -> TaskState:
        """Wait until the task is completed and return its state; raises ``TimeoutError``.

        Wakes on notifications from writers where the backend has them (a notification may
        carry the completed state itself), and otherwise re-reads every ``poll_interval``
        seconds (for states written by Go workers, which notify nobody).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._waiters.watch(task_uuid) as waiter:
            await self._subscribe(task_uuid)
            try:
                state = await self.get_state(task_uuid)
                while state is None or state.state not in COMPLETED_STATES:
                    wait = self.poll_interval
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            raise TimeoutError(f"task {task_uuid} did not complete within {timeout} s")
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waiter.event.wait(), wait)
                    waiter.event.clear()
                    delivered, waiter.state = waiter.state, None
                    state = TaskState.decode(delivered) if delivered else await self.get_state(task_uuid)
                return state
            finally:
                await self._unsubscribe(task_uuid)

    async def _subscribe(self, task_uuid: str) -> None:
        """Hook for backends that listen for completions from other processes."""

    async def _unsubscribe(self, task_uuid: str) -> None:
        """Undo ``_subscribe``."""

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
    async def trigger_chord(self, group_uuid: str) -> bool:
        """Atomically flip the group's ``ChordTriggered``; True for exactly one caller."""

    @abstractmethod
    async def purge_state(self, task_uuid: str) -> None:
        """Forget a task's state."""

    @abstractmethod
    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget a group's metadata."""

    async def close(self) -> None:
        """Release connections held by this backend."""

    async def close_loop_connections(self) -> None:
        """Close the connections bound to the running event loop; see ``Broker``'s."""
