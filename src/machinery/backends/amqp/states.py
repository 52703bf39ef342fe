"""What the RabbitMQ result backend knows about task states beyond its queues.

* ``StateCache``: the latest state seen per task in this process, which answers when a
  task's queue has been emptied or deleted by a Go reader;
* ``StateWatcher``: one event loop's exclusive queue, bound to the exchange with the UUIDs
  of the tasks being awaited, so that every state written for them (by any writer, Go too)
  is delivered there and wakes the waiter instead of a poll.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ... import log
from ..._drivers.amqp import AMQP_ERRORS, Session, amqp_errors, on_close, quietly
from ...errors import MessageDecodeError
from ...state import PENDING, TaskState

#: How long a watcher keeps a binding after its last waiter left (ChordAsyncResult waits in
#: short slices; this spares a bind/unbind pair per slice).
WATCH_LINGER = 10.0


def decode_state_or_none(body: bytes | None) -> TaskState | None:
    """The task state in ``body``; None when there is none or it is not a task state."""
    if not body:
        return None
    try:
        return TaskState.decode(body)
    except MessageDecodeError:
        return None


class StateCache:
    """The latest state seen per task, bounded and expiring with the results.

    A final state (SUCCESS/FAILURE) is not replaced by a RECEIVED/STARTED/RETRY arriving
    later: that is a duplicate run of a redelivered message, and the task stays completed.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, TaskState]] = OrderedDict()

    def apply(self, task_uuid: str, state: TaskState, ttl: int) -> None:
        with self._lock:
            entry = self._entries.get(task_uuid)
            old = entry[1] if entry is not None and entry[0] > time.monotonic() else None
            if old is not None:
                if old.is_completed() and not state.is_completed() and state.state != PENDING:
                    return
                if not state.task_name:
                    state.task_name = old.task_name
                if state.created_at is None or state.created_at.year == 1:
                    state.created_at = old.created_at
            self._entries[task_uuid] = (time.monotonic() + ttl, state)
            self._entries.move_to_end(task_uuid)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def get(self, task_uuid: str) -> TaskState | None:
        with self._lock:
            entry = self._entries.get(task_uuid)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._entries[task_uuid]
                return None
            state = entry[1]
            return TaskState(
                state.task_uuid, state.state, state.task_name, state.results, state.error, state.created_at, state.ttl
            )

    def forget(self, task_uuid: str) -> None:
        with self._lock:
            self._entries.pop(task_uuid, None)


class StateWatcher:
    """One loop's exclusive, server-named queue, bound to the exchange once per awaited task.

    ``on_state(task_uuid, body)`` is called for every state delivered; when the channel is
    lost, ``on_lost(task_uuid)`` is called for every watched task, so that its waiters read
    again and watch again on a new connection.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        exchange: str,
        on_state: Callable[[str, bytes], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._exchange = exchange
        self._on_state = on_state
        self._on_lost = on_lost
        self._counts: dict[str, int] = {}
        self._bound: set[str] = set()
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self.alive = True

    @classmethod
    async def open(
        cls,
        session: Session,
        exchange: str,
        on_state: Callable[[str, bytes], None],
        on_lost: Callable[[str], None],
    ) -> StateWatcher:
        with amqp_errors("opening the result watch queue"):
            channel = await session.connection.channel(publisher_confirms=False)
            try:
                queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
                watcher = cls(channel, queue, exchange, on_state, on_lost)
                on_close(channel, watcher._lost)
                await queue.consume(watcher._on_message, no_ack=True)
            except BaseException:
                await quietly(channel.close())
                raise
        return watcher

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        if incoming.routing_key:
            self._on_state(incoming.routing_key, incoming.body)

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for handle in self._lingering.values():
            handle.cancel()
        for task_uuid in list(self._counts):
            self._on_lost(task_uuid)

    async def acquire(self, task_uuid: str) -> None:
        """Count one more waiter for ``task_uuid``; bind the queue for it if not bound yet."""
        handle = self._lingering.pop(task_uuid, None)
        if handle is not None:
            handle.cancel()
        self._counts[task_uuid] = self._counts.get(task_uuid, 0) + 1
        if task_uuid in self._bound:
            return
        self._bound.add(task_uuid)
        try:
            with amqp_errors(f"watching {task_uuid}"):
                await self._queue.bind(self._exchange, task_uuid)
        except BaseException:
            self._bound.discard(task_uuid)
            self.release(task_uuid)
            raise

    def release(self, task_uuid: str) -> None:
        """One waiter fewer; the binding lingers a little after the last one leaves."""
        count = self._counts.get(task_uuid, 0) - 1
        if count > 0:
            self._counts[task_uuid] = count
            return
        self._counts.pop(task_uuid, None)
        if not self.alive or task_uuid not in self._bound or task_uuid in self._lingering:
            return
        # Result objects often wait again right away (ChordAsyncResult waits in slices).
        self._lingering[task_uuid] = asyncio.get_running_loop().call_later(
            WATCH_LINGER, lambda: asyncio.ensure_future(self._unbind(task_uuid))
        )

    async def _unbind(self, task_uuid: str) -> None:
        self._lingering.pop(task_uuid, None)
        if self._counts.get(task_uuid) or not self.alive:
            return  # watched again meanwhile
        self._bound.discard(task_uuid)
        try:
            await self._queue.unbind(self._exchange, task_uuid)
        except AMQP_ERRORS as exc:
            log.logger.debug("unbinding the watch of %s: %s", task_uuid, exc)

    async def close(self) -> None:
        self.alive = False
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        await quietly(self._channel.close())
