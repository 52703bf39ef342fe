"""Groups and chords in the RabbitMQ result backend: the queues beside a group's, their locking,
and deciding a chord in a way that interlocks with Go workers (docs/wire.md §11.2).

* ``<group>``: the group queue, where each member's SUCCESS/FAILURE is published (as Go does).
* ``<group>_meta``: the group's metadata (Go's AMQP backend keeps none).
* ``<group>_chord_triggered``: Go's chord marker, here a real test-and-set
  (``take_chord_token``): limited to one message with ``x-overflow: reject-publish``, it
  accepts (confirms) exactly one token and nacks every later publish. Its existence also
  stops Go workers, whose ``TriggerChord`` returns false when that queue exists.
* ``<group>_lock``: the per-group lock (``GroupLocks``), an exclusive queue that RabbitMQ
  refuses to any other connection and deletes if its holder's connection dies. It
  serialises our own deciders; Go knows nothing of it.

Deciding beside Go. A Go worker whose member completes a group counts the group queue's
ready messages (``== GroupTaskCount``), checks the marker is absent, counts again, takes the
member states with an exclusive *consumer* (acking each), sends the callback, and deletes
the group queue and the marker. ``basic.get`` is allowed beside an exclusive consumer, so
every message is held either by Go's consumer or by our ``basic.get`` (``hold_group``),
never both, and whoever holds all the members' states decides:

* while we hold messages, Go counts fewer than the group's size and gives up;
* a consumer on the group queue can only be Go's (we never consume it): then we keep out;
* we decide only when we hold every member's final state, take the marker, ack them and
  delete the group queue, which also ends a Go consumer that came too late (it sees a
  cancelled consume and gives up) instead of leaving it waiting;
* otherwise we put everything back and count again, so a completion published while we
  held the queue is never missed by both of us.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ... import log
from ..._drivers.amqp import (
    AMQP_ERRORS,
    AMQPConnector,
    AMQPInt32,
    PublishRejected,
    Session,
    amqp_errors,
    bounded,
    expiry_ms_int32,
    give_back,
    message,
    quietly,
    take_messages,
)
from ..._loops import PerLoop
from ...errors import BrokerConnectionError
from ...state import TaskState
from .states import decode_state_or_none

#: Seconds to wait for another process's group lock before giving up.
GROUP_LOCK_TIMEOUT = 30.0


def meta_queue(group_uuid: str) -> str:
    """Where this backend keeps a group's metadata (Go's AMQP backend keeps none)."""
    return f"{group_uuid}_meta"


def chord_triggered_queue(group_uuid: str) -> str:
    """Go's marker name (``amqmChordTriggeredQueue``); its existence means "already triggered"."""
    return f"{group_uuid}_chord_triggered"


def group_lock_queue(group_uuid: str) -> str:
    return f"{group_uuid}_lock"


@dataclass
class HeldGroup:
    """The messages of a group queue we have taken (unacked), and the members' states in them."""

    taken: list[AbstractIncomingMessage]
    states: list[TaskState]  # each member once, in completion order

    def completed(self, task_count: int) -> bool:
        return sum(1 for s in self.states if s.is_completed()) >= task_count


async def ack_all(taken: Sequence[AbstractIncomingMessage]) -> None:
    """Ack every message taken on one channel (``basic.ack`` multiple on the last)."""
    if taken:
        await bounded(taken[-1].ack(multiple=True))


class DecidedGroups:
    """The member states of the chords this process decided, kept a while for the decision's
    next steps (the group queue is deleted once decided, and a Go chord stores no metadata)."""

    SIZE = 1000

    def __init__(self) -> None:
        self._states: OrderedDict[str, list[TaskState]] = OrderedDict()

    def remember(self, group_uuid: str, states: list[TaskState]) -> None:
        self._states[group_uuid] = states
        self._states.move_to_end(group_uuid)
        while len(self._states) > self.SIZE:
            self._states.popitem(last=False)

    def get(self, group_uuid: str) -> list[TaskState] | None:
        return self._states.get(group_uuid)


async def declare_group_queue(channel: AbstractChannel, group_uuid: str, arguments: dict[str, Any]) -> AbstractQueue:
    """The group queue, declared as Go declares it (its declare-ok carries the counts)."""
    with amqp_errors(f"declaring group queue {group_uuid!r}"):
        return await channel.declare_queue(group_uuid, durable=False, auto_delete=True, arguments=arguments)


def counts(queue: AbstractQueue) -> tuple[int, int]:
    """(ready messages, consumers) as the queue's declare-ok said."""
    result = queue.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def hold_group(
    channel: AbstractChannel, group_uuid: str, arguments: dict[str, Any], task_count: int
) -> HeldGroup | None:
    """Take every member state of a complete group (unacked, on ``channel``), or None.

    None when the group is not complete yet, or when a Go worker is consuming its queue (it
    decides then). Call with the group's lock held, so that our own deciders take turns.
    """
    while True:
        queue = await declare_group_queue(channel, group_uuid, arguments)
        ready, consumers = counts(queue)
        if consumers or ready < task_count:
            return None
        with amqp_errors(f"reading group queue {group_uuid!r}"):
            taken = await take_messages(queue)
        held = HeldGroup(taken, distinct_members([s for m in taken if (s := decode_state_or_none(m.body))]))
        if held.completed(task_count):
            return held
        # A member run twice made the count look complete. Put everything back; if a member
        # completed meanwhile (it counted fewer while we held them, and gave up), look again.
        with amqp_errors(f"giving back group queue {group_uuid!r}"):
            await give_back(taken)
            again = await declare_group_queue(channel, group_uuid, arguments)
        if counts(again)[0] <= len(taken):
            return None


def distinct_members(states: Sequence[TaskState]) -> list[TaskState]:
    """Each member once (a member run twice publishes twice): in the place of its first
    completion, with its latest state."""
    order: dict[str, TaskState] = {}
    for state in states:
        if state.task_uuid not in order or state.is_completed():
            order[state.task_uuid] = state
    return list(order.values())


async def take_chord_token(session: Session, group_uuid: str, ttl: int) -> bool:
    """True for exactly one caller per group: the one whose token the marker queue took.

    The marker lives ``ttl`` seconds after its last use, so that a member redelivered
    later can never trigger the chord again.
    """
    name = chord_triggered_queue(group_uuid)
    arguments = {
        "x-max-length": AMQPInt32(1),
        "x-overflow": "reject-publish",
        "x-expires": expiry_ms_int32(ttl),
    }
    for _ in range(3):
        with amqp_errors(f"declaring {name!r}"):
            await session.queue(name, durable=False, auto_delete=False, arguments=arguments, cache=False)
        try:
            routed = await session.publish("", name, message(b"triggered"), mandatory=True)
        except PublishRejected:
            return False
        if routed:
            return True
        # The marker expired between declaring and publishing: declare it again.
    raise BrokerConnectionError(f"could not create the chord marker {name!r}")


@dataclass
class _LoopLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    """Coroutines holding or waiting for the lock: it is forgotten when none are left."""


class GroupLocks:
    """One lock per group, for reading the group queue while no one else does.

    Across processes the lock is an exclusive queue (RabbitMQ refuses to declare it for any
    other connection, and deletes it if the holder's connection dies); within one event
    loop, whose coroutines share one connection, an asyncio lock.
    """

    def __init__(self, connector: AMQPConnector) -> None:
        self._connector = connector
        self._locks: PerLoop[dict[str, _LoopLock]] = PerLoop(dict)

    @asynccontextmanager
    async def hold(self, group_uuid: str) -> AsyncIterator[AbstractChannel]:
        """Hold the group's lock; yields the channel that holds it, for reading the group queue."""
        locks = self._locks.get()
        entry = locks.get(group_uuid)
        if entry is None:
            entry = locks[group_uuid] = _LoopLock()
        entry.users += 1
        try:
            async with entry.lock:
                channel = await self._acquire(group_uuid)
                try:
                    yield channel
                finally:
                    await _release(channel, group_uuid)
        finally:
            entry.users -= 1
            if not entry.users:
                locks.pop(group_uuid, None)

    async def _acquire(self, group_uuid: str) -> AbstractChannel:
        """Declare the group's lock queue, waiting while another connection holds it."""
        session = await self._connector.session()
        name = group_lock_queue(group_uuid)
        deadline = time.monotonic() + GROUP_LOCK_TIMEOUT
        pause = 0.01
        while True:
            with amqp_errors("opening a channel"):
                channel: AbstractChannel = await session.connection.channel(publisher_confirms=False)
            try:
                await channel.declare_queue(name, exclusive=True, auto_delete=True)
                return channel
            except aiormq.exceptions.ChannelLockedResource:
                # Held by another connection; RabbitMQ closed this channel.
                if time.monotonic() > deadline:
                    raise BrokerConnectionError(
                        f"group {group_uuid} stayed locked for {GROUP_LOCK_TIMEOUT} s"
                    ) from None
                await asyncio.sleep(pause)
                pause = min(0.2, pause * 2)
            except AMQP_ERRORS as exc:
                await quietly(channel.close())
                raise BrokerConnectionError(f"cannot lock group {group_uuid}: {exc}") from exc


async def _release(channel: AbstractChannel, group_uuid: str) -> None:
    """Delete the group's lock queue and close the channel that declared it."""
    try:
        if not channel.is_closed:
            underlay = await channel.get_underlay_channel()
            await underlay.queue_delete(group_lock_queue(group_uuid))
    except AMQP_ERRORS as exc:  # the connection is gone, and the lock with it
        log.logger.debug("releasing the lock of group %s: %s", group_uuid, exc)
    finally:
        await quietly(channel.close())
