"""The RabbitMQ result backend: Go Machinery's queue per task holding the stream of its states.

Layout (docs/wire.md §11.2), shared with Go:

* every state write publishes the TaskState JSON (persistent, ``application/json``) to the
  exchange with routing key = task UUID, into a queue named the task UUID: non-durable,
  auto-delete, ``x-message-ttl`` = ``x-expires`` = ``results_expire_in`` x 1000 as 32-bit
  integers, bound with the task UUID. The queue holds the stream PENDING, RECEIVED,
  STARTED, (RETRY, PENDING, ...), SUCCESS/FAILURE. As in Go, worker-side states carry an
  empty TaskName and a zero CreatedAt (no merge); readers here fill both in from an earlier
  state of the stream when they have seen one.
* a group member's SUCCESS/FAILURE is also published to a queue named the group UUID.

Reading. Go's ``GetState`` takes (and acks) the *oldest* message, one per call, so Go's
``AsyncResult`` walks the stream and deletes the queue once it sees a completed state. Here a
read takes every message present, acks all but the latest state and puts that one back (nack
with requeue, which returns it to the head of the queue): the queue is compacted to the
latest state instead of emptied, so a later reader in any process, Go's included, still
finds it. Which one is latest is read from the states (a completed one, else the last
taken), not from the order taken: a message another reader puts back meanwhile returns to
the head and is taken after newer ones. The latest state seen is also kept in a per-process cache (bounded, expiring
with the results), which answers when the queue has been emptied by a destructive Go reader
or deleted by Go's ``AsyncResult``. Reads and Go's reads still compete for the same messages:
a Go ``AsyncResult`` polling a task that a Python process is also reading may miss the
intermediate states (never the final one unless it reads after Go deleted the queue).

Waiting (``await_state``) does not poll: a private exclusive queue per event loop is bound to
the exchange with the awaited task UUIDs, so every state written for them (by any writer, Go
too) is delivered there as well and wakes the waiter. A slow re-read (``poll_interval``)
remains only as a safety net.

Groups and chords. ``group_completed`` counts the group queue like Go, but a member run
twice (at-least-once) would be counted twice, so when the count reaches the group size the
queue is read under a per-group lock (an exclusive queue, released if its holder dies) and
distinct members are counted. ``trigger_chord`` is a real test-and-set instead of Go's
always-true check: a ``<group>_chord_triggered`` queue limited to one message with
``x-overflow: reject-publish`` accepts (confirms) exactly one token; every later publish is
nacked. Its existence also stops Go workers, whose ``TriggerChord`` returns false when that
queue exists. The queues beside a group's, and the lock, are in ``groups``; the state
cache and the watch queue in ``states``; what is kept beside the states (annotations,
revocations, worker heartbeats) in ``records``.

Cost. One queue per task (and per group) lives for ``results_expire_in`` seconds and every
state is a message; a state write is a confirmed publish (plus a queue declaration for the
first one), a read is several round trips. That suits hundreds of tasks per second; for large
volumes use the Redis backend, as Go Machinery's own documentation advises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import aiormq
from aio_pika.abc import AbstractQueue

from ... import log
from ..._drivers.amqp import (
    AMQP_ERRORS,
    AMQPConnector,
    Session,
    amqp_errors,
    bounded,
    expiry_ms_int32,
    gather_all,
    give_back,
    message,
    split_urls,
    take_messages,
)
from ..._loops import PerLoop
from ...config import Config
from ...errors import BrokerConnectionError, MessageDecodeError, ResultConsumedError
from ...signature import Signature
from ...state import COMPLETED_STATES, GroupMeta, TaskState, WorkerInfo
from ...types import TaskResult
from ..base import Backend
from .groups import (
    DecidedGroups,
    GroupLocks,
    ack_all,
    chord_triggered_queue,
    counts,
    declare_group_queue,
    distinct_members,
    hold_group,
    meta_queue,
    take_chord_token,
)
from .records import BesideRecords
from .states import StateCache, StateWatcher, decode_state_or_none

__all__ = ["AMQPBackend", "chord_triggered_queue", "meta_queue"]

#: Latest states kept per process.
CACHE_SIZE = 50_000
#: Reads in flight at once per event loop (each holds a channel for a few round trips).
READ_CONCURRENCY = 32


class _WatcherSlot:
    """The running loop's watch queue, once opened (replaced when its channel dies)."""

    def __init__(self) -> None:
        self.watcher: StateWatcher | None = None


class AMQPBackend(Backend):
    """Task states as message streams in RabbitMQ, readable by Go Machinery and reading Go's."""

    #: Only a safety net: waiters are woken by deliveries to their watch queue.
    poll_interval: float = 5.0
    unknown_state_hint = "; or another reader (a Go AsyncResult) took its states and deleted its queue"

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._connector = AMQPConnector(split_urls(url, config.multiple_broker_separator), role="backend")
        self._cache = StateCache(CACHE_SIZE)
        self._watchers: PerLoop[_WatcherSlot] = PerLoop(_WatcherSlot)
        self._read_slots: PerLoop[asyncio.Semaphore] = PerLoop(lambda: asyncio.Semaphore(READ_CONCURRENCY))
        self._group_locks = GroupLocks(self._connector)
        self._decided = DecidedGroups()
        self._records = BesideRecords(self._connector, lambda: self._exchange)

    # ------------------------------------------------------------------ layout

    @property
    def _exchange(self) -> str:
        return self.config.amqp.exchange

    def _queue_args(self) -> dict[str, Any]:
        ttl = expiry_ms_int32(self.ttl)
        return {"x-message-ttl": ttl, "x-expires": ttl}

    async def _declare(self, session: Session, name: str, cache: bool = False) -> int:
        """Declare a state queue as Go does (and bind it to the exchange with its own name)."""
        return await session.queue(
            name,
            durable=False,
            auto_delete=True,
            arguments=self._queue_args(),
            exchange=self._exchange,
            exchange_type=self.config.amqp.exchange_type,
            binding_key=name,
            cache=cache,
        )

    # ------------------------------------------------------------------ writes

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        """Publish each state to its task's queue, in order per task.

        Worker-side writes (``keep_created``) are sent as Go sends them: TaskName empty and
        CreatedAt zero (docs/wire.md §5: the AMQP backend does not merge).
        """
        streams: dict[str, list[bytes]] = {}
        completed: list[tuple[str, bytes]] = []
        for state in states:
            wire = state
            if keep_created:
                wire = TaskState(state.task_uuid, state.state, "", state.results, state.error, None, state.ttl)
            body = wire.encode()
            streams.setdefault(state.task_uuid, []).append(body)
            if state.state in COMPLETED_STATES:
                completed.append((state.task_uuid, body))
        session = await self._connector.session()

        async def write(task_uuid: str, bodies: list[bytes]) -> None:
            for body in bodies:
                await self._publish(session, task_uuid, body, declare_first=not keep_created)

        await gather_all([write(task_uuid, bodies) for task_uuid, bodies in streams.items()])
        for state in states:  # what this process wrote, it has seen (see ResultConsumedError)
            self._cache.apply(state.task_uuid, state, self.ttl)
        for task_uuid, body in completed:
            self._waiters.notify(task_uuid, body)

    async def set_state(
        self, signature: Signature, state: str, results: list[TaskResult] | None = None, error: str = ""
    ) -> None:
        """Write a worker-side state; a group member's final state also goes to the group queue."""
        await super().set_state(signature, state, results, error)
        if state in COMPLETED_STATES and signature.group_uuid and signature.group_task_count > 0:
            body = TaskState(signature.uuid, state, "", results, error).encode()
            session = await self._connector.session()
            await self._publish(session, signature.group_uuid, body, declare_first=False)

    async def _publish(self, session: Session, queue: str, body: bytes, declare_first: bool) -> None:
        """Publish to a state queue; declare it first, or only when RabbitMQ returns the message.

        Worker-side writes go to a queue the sender has declared, so they try the publish
        alone (mandatory) and declare only if it comes back unroutable.
        """
        amqp = self.config.amqp

        async def routed() -> bool:
            return await session.publish(
                amqp.exchange, queue, message(body), exchange_type=amqp.exchange_type, mandatory=True
            )

        if not declare_first and await routed():
            return
        with amqp_errors(f"declaring result queue {queue!r}"):
            await self._declare(session, queue)
        if not await routed():
            raise BrokerConnectionError(f"RabbitMQ could not route a state to its queue {queue!r}")

    # ------------------------------------------------------------------ reads

    async def get_state(self, task_uuid: str) -> TaskState | None:
        """The latest state of the task (reading compacts its queue to that state).

        Raises ``ResultConsumedError`` when the task's queue is gone although this process
        has seen it unfinished: another reader (a Go ``AsyncResult``) took its states and
        deleted it, so its outcome cannot be read here.
        """
        # What this process had seen before the read: a state it writes while the read runs
        # (its worker sending the task) may be newer than the queue the read found missing.
        seen = self._cache.get(task_uuid)
        bodies = await self._read_stream(task_uuid, latest_state)
        if bodies is None:
            if seen is not None and not seen.is_completed():
                raise ResultConsumedError(
                    task_uuid,
                    f"the states of task {task_uuid} were taken by another reader: its queue is gone (a Go "
                    f"AsyncResult reads it destructively and deletes it after the final state); the last state "
                    f"seen here was {seen.state}",
                )
            return self._cache.get(task_uuid)
        for body in bodies:
            try:
                self._cache.apply(task_uuid, TaskState.decode(body), self.ttl)
            except MessageDecodeError as exc:
                log.logger.warning("ignoring an undecodable message in result queue %r: %s", task_uuid, exc)
        return self._cache.get(task_uuid)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        return list(await asyncio.gather(*(self.get_state(u) for u in task_uuids)))

    async def _read_stream(self, name: str, latest: Callable[[list[bytes]], int]) -> list[bytes] | None:
        """Every message now in queue ``name``, the one ``latest`` picks last; only that one is
        left in the queue. None when there is no such queue (never written, expired, or deleted
        by a reader).

        Unlike Go's GetState, a read never creates the queue: one that is missing tells that
        the task is unknown here, or that its states were taken. Each read has a channel of
        its own (pooled): closing it is what returns the messages taken if the read fails or
        is cancelled half-way, and no other read shares its fate.
        """
        async with self._read_slots.get():
            session = await self._connector.session()
            with amqp_errors(f"reading result queue {name!r}"):
                async with session.pooled_channel() as channel:
                    try:
                        queue = await channel.declare_queue(name, passive=True)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        return None  # (RabbitMQ closed the channel: it is not pooled again)
                    return await _take_keeping(queue, latest)

    # ------------------------------------------------------------------ waiting

    # Waiting is the base class's loop; these hooks bind it to this loop's watch queue, which
    # every state written for an awaited task (by any writer, Go's too) reaches.

    async def _subscribe(self, task_uuid: str) -> StateWatcher | None:
        """Bind this loop's watch queue to ``task_uuid``; None (and polling) if that fails."""
        if not self._exchange:
            return None  # the default exchange takes no bindings: poll
        slot = self._watchers.get()
        try:
            watcher = slot.watcher
            if watcher is None or not watcher.alive:
                session = await self._connector.session()
                watcher = slot.watcher = await StateWatcher.open(
                    session, self._exchange, self._delivered, self._waiters.notify
                )
            await watcher.acquire(task_uuid)
            return watcher
        except AMQP_ERRORS as exc:  # BrokerConnectionError is a ConnectionError
            log.logger.debug("cannot watch %s (%s); polling instead", task_uuid, exc)
            return None

    async def _resubscribe(self, task_uuid: str, handle: StateWatcher | None) -> StateWatcher | None:
        if handle is not None and handle.alive:
            return handle
        if handle is not None:
            handle.release(task_uuid)
        return await self._subscribe(task_uuid)

    async def _unsubscribe(self, task_uuid: str, handle: StateWatcher | None) -> None:
        if handle is not None:
            handle.release(task_uuid)

    def _poll_interval(self, handle: StateWatcher | None) -> float:
        # A lost watch queue is set up again after the next look; look sooner then.
        return self.poll_interval if handle is not None and handle.alive else 1.0

    def _notified_state(self, task_uuid: str, body: bytes) -> TaskState | None:
        state = decode_state_or_none(body)
        if state is None or not state.is_completed():
            return None
        self._cache.apply(task_uuid, state, self.ttl)  # fills in TaskName and CreatedAt
        return self._cache.get(task_uuid)

    def _delivered(self, task_uuid: str, body: bytes) -> None:
        """A state for a watched task went through the exchange: hand a final one to its waiters.

        Every state written for the task reaches the watch queue, so the others (RECEIVED,
        STARTED, RETRY, PENDING) need no read: the waiter sleeps on until the final one.
        """
        state = decode_state_or_none(body)
        if state is not None and state.is_completed():
            self._cache.apply(task_uuid, state, self.ttl)
            self._waiters.notify(task_uuid, body)

    # ------------------------------------------------------------------ groups

    async def write_group_meta(self, meta: GroupMeta) -> None:
        """Keep the metadata in a ``<group>_meta`` queue (latest message wins).

        Go's AMQP backend stores none; Go readers never look at this queue.
        """
        session = await self._connector.session()
        await self._publish(session, meta_queue(meta.group_uuid), meta.encode(), declare_first=True)

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        """The stored metadata; for a group sent by Go (which stores none), its members in
        completion order, as decided here or as the group queue holds them."""
        meta = await self._stored_group_meta(group_uuid)
        if meta is not None:
            return meta
        states = await self._completed_members(group_uuid)
        if not states:
            return None
        log.logger.debug("group %s has no stored metadata (sent by Go): members in completion order", group_uuid)
        return GroupMeta(group_uuid, [s.task_uuid for s in states])

    async def group_task_states(self, group_uuid: str) -> list[TaskState | None]:
        """The completed members' states in completion order (Go's AMQP order), each member once."""
        return list(await self._completed_members(group_uuid))

    async def group_completed(self, group_uuid: str, task_count: int) -> bool:
        """Go's check: the group queue holds a final state per member, and nobody is consuming
        it (a Go worker deciding). Cheap and never takes anything; ``trigger_chord`` decides
        on the distinct members' states themselves (a member run twice counts twice here)."""
        if task_count <= 0:
            return True
        session = await self._connector.session()
        async with session.side_channel() as channel:
            ready, consumers = counts(await declare_group_queue(channel, group_uuid, self._queue_args()))
        return ready >= task_count and not consumers

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        """True for exactly one decider, Go's included: the one that holds every member's final
        state in the group queue and takes the marker (see ``groups`` for the interlock)."""
        async with self._group_locks.hold(group_uuid) as channel:
            held = await hold_group(channel, group_uuid, self._queue_args(), max(1, task_count))
            if held is None:
                return False
            session = await self._connector.session()
            if not await take_chord_token(session, group_uuid, self.ttl):
                with amqp_errors(f"giving back group queue {group_uuid!r}"):
                    await give_back(held.taken)
                return False
            with amqp_errors(f"taking group queue {group_uuid!r}"):
                await ack_all(held.taken)
                # As Go does once decided; a Go consumer that came too late then gives up.
                underlay = await channel.get_underlay_channel()
                await underlay.queue_delete(group_uuid)
        self._decided.remember(group_uuid, held.states)
        meta = await self._stored_group_meta(group_uuid)
        if meta is not None:
            meta.chord_triggered = True
            await self.write_group_meta(meta)
        return True

    async def _stored_group_meta(self, group_uuid: str) -> GroupMeta | None:
        """The latest metadata in the group's ``<group>_meta`` queue, if any."""
        for body in reversed(await self._read_stream(meta_queue(group_uuid), latest_meta) or []):
            try:
                return GroupMeta.decode(body)
            except MessageDecodeError:
                continue
        return None

    async def _completed_members(self, group_uuid: str) -> list[TaskState]:
        """The members this process decided the chord on, or else those the group queue holds
        (read and put back at once: for showing a group, never for deciding)."""
        decided = self._decided.get(group_uuid)
        if decided is not None:
            return decided
        async with self._group_locks.hold(group_uuid) as channel:
            queue = await declare_group_queue(channel, group_uuid, self._queue_args())
            with amqp_errors(f"reading group queue {group_uuid!r}"):
                taken = await take_messages(queue)
                await give_back(taken)
        return distinct_members([s for m in taken if (s := decode_state_or_none(m.body))])

    # ------------------------------------------------------------------ beside the state (records.py)

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        await self._records.write_annotation(task_uuid, name, value, self.ttl)

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        return await self._records.get_annotation(task_uuid, name)

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        await self._records.revoke(task_uuid, terminate, self.ttl)

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        return await self._records.revocations(since)

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._records.write_worker(info, ttl)

    async def forget_worker(self, tag: str) -> None:
        await self._records.forget_worker(tag)

    async def get_workers(self) -> list[WorkerInfo]:
        return await self._records.get_workers()

    # ------------------------------------------------------------------ purging

    async def purge_state(self, task_uuid: str) -> None:
        """Delete the task's queue (as Go's ``AsyncResult`` does after completion)."""
        await self._delete_queues(task_uuid)
        self._cache.forget(task_uuid)

    async def purge_group_meta(self, group_uuid: str) -> None:
        """Delete the group queue and its metadata. The chord marker stays until it expires,
        so that a member redelivered later can never trigger the chord again."""
        await self._delete_queues(group_uuid, meta_queue(group_uuid))

    async def _delete_queues(self, *names: str) -> None:
        session = await self._connector.session()
        async with session.side_channel() as channel:
            with amqp_errors(f"deleting {', '.join(names)}"):
                underlay = await channel.get_underlay_channel()
                for name in names:
                    await underlay.queue_delete(name)
        for name in names:
            session.forget(name)

    async def close(self) -> None:
        """Close this loop's connection and watch queue (other loops' close when their loop ends)."""
        await self.close_loop_connections()

    async def close_loop_connections(self) -> None:
        slot = self._watchers.pop()
        if slot is not None and slot.watcher is not None:
            await slot.watcher.close()
        await self._connector.close()


async def _take_keeping(queue: AbstractQueue, latest: Callable[[list[bytes]], int]) -> list[bytes]:
    """Take the messages ``queue`` holds, put back the one ``latest`` picks and ack the others;
    returns their bodies with the kept one last."""
    taken = await take_messages(queue, limit=int(queue.declaration_result.message_count or 0))
    if not taken:
        return []
    bodies = [incoming.body for incoming in taken]
    kept = latest(bodies)
    for index, incoming in enumerate(taken):
        if index != kept:
            await bounded(incoming.ack())
    # Back to the head of the queue (its original place) for the next reader, Go's included.
    await bounded(taken[kept].nack(requeue=True))
    return [*bodies[:kept], *bodies[kept + 1 :], bodies[kept]]


def latest_state(bodies: list[bytes]) -> int:
    """The last completed state taken, else the last taken (a state is never undone)."""
    for index in range(len(bodies) - 1, -1, -1):
        state = decode_state_or_none(bodies[index])
        if state is not None and state.is_completed():
            return index
    return len(bodies) - 1


def latest_meta(bodies: list[bytes]) -> int:
    """The last metadata taken that says the chord was triggered, else the last taken."""
    for index in range(len(bodies) - 1, -1, -1):
        try:
            if GroupMeta.decode(bodies[index]).chord_triggered:
                return index
        except MessageDecodeError:
            continue
    return len(bodies) - 1
