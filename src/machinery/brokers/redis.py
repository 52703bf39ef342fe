"""The Redis broker: Go Machinery's queue format, with at-least-once delivery on top.

Go's lists are kept exactly: tasks are JSON elements RPUSHed onto a list named after the
queue, delayed tasks are members of the ``delayed_tasks`` sorted set scored in Unix ns, so
Go and Python workers share one queue. What Go lacks is added beside it, never in it:

- A consumer moves each message (LMOVE/BLMOVE) from the queue into a processing list of its
  own in the same atomic step, and removes it only when the worker acks it.
- Each consumer refreshes a heartbeat in a sorted set. Any consumer that finds a heartbeat
  expired returns that consumer's processing list to the head of the queue (one Lua script,
  so two reapers cannot both return it).
- A prioritized message (``Priority`` 1-9) is inserted at the head of Go's list, behind those
  of its priority or higher, so Go's BLPOP and our LMOVE both take the highest first; the list
  stays a plain Go queue.
- Due delayed tasks move in batches with one script per round trip, and the mover sleeps
  until the next ETA rather than polling blindly.

Keys added: ``machinery:processing:{<queue>}:<consumer>`` (list),
``machinery:heartbeats:{<queue>}`` (sorted set), ``machinery:dead:{<queue>}`` (list). The
braces are a hash tag: on a Redis Cluster each lands in the slot of Go's queue list, so every
script on a queue (take, settle, reap, release, requeue dead letters) runs on one slot,
atomically. Go's ``delayed_tasks`` set is in a slot of its own; what moves a message between
it and a queue is then done in at-least-once steps (:mod:`machinery.brokers._redis_delayed`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import log
from .._drivers.redis import LuaScript, RedisConnector, tagged
from ..backends.base import pending_states
from ..config import Config
from ..signature import Signature
from ..state import TaskState
from ..types import unix_ns
from ._redis_delayed import defer_in_steps, move_due_in_steps
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

if TYPE_CHECKING:
    from ..backends.base import Backend

DELAYED_BATCH = 500
RELEASED_HEARTBEAT_GRACE = 2.0

_FETCH = LuaScript.load("fetch")
_SETTLE = LuaScript.load("settle")
_DEFER = LuaScript.load("defer")
_REAP = LuaScript.load("reap")
_RELEASE = LuaScript.load("release")
_BEAT = LuaScript.load("beat")
_MOVE_DUE = LuaScript.load("move_due", "priority")
_PUSH_PRIORITIZED = LuaScript.load("push_prioritized", "priority")
_REQUEUE_DEAD = LuaScript.load("requeue_dead")
_SEND = LuaScript.load("send")


def processing_prefix(queue: str) -> str:
    """The prefix of every consumer's processing list on ``queue`` (in the queue's slot)."""
    return tagged("machinery:processing:", queue, ":")


def heartbeats_key(queue: str) -> str:
    """The consumers' heartbeats on ``queue`` (in the queue's slot)."""
    return tagged("machinery:heartbeats:", queue)


def dead_key(queue: str) -> str:
    """The dead letters of ``queue`` (in the queue's slot)."""
    return tagged("machinery:dead:", queue)


class RedisBroker(Broker):
    """Go Machinery's Redis queues with processing lists, heartbeats and a batched delayed mover."""

    idle_loop_ok = True  # nothing to keep up between calls

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.connector = RedisConnector(config.broker_urls()[0], config.redis)

    @property
    def delayed_key(self) -> str:
        return self.config.redis.delayed_tasks_key or "delayed_tasks"

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        by_queue: dict[str, list[bytes]] = defaultdict(list)
        for queue, body in messages:
            by_queue[queue].append(body)
        pipeline = self.connector.batched()
        await asyncio.gather(*(pipeline.execute("RPUSH", queue, *bodies) for queue, bodies in by_queue.items()))

    async def publish_with_pending(self, signatures: Sequence[Signature], backend: Backend) -> None:
        """PENDING and the push in one script when the backend is this same Redis (its states
        are Go's plain ``SET``s, and the script is atomic, so Go's order holds); otherwise, or
        for delayed or prioritized messages, as every broker does."""
        if not self.connector.same_server(getattr(backend, "connector", None)):
            await super().publish_with_pending(signatures, backend)
            return
        ready, prioritized, delayed = self._sort(signatures)
        if prioritized or delayed:
            await super().publish_with_pending(signatures, backend)
            return
        await self._push_with_pending(ready, pending_states(signatures), backend.ttl)

    async def _push_with_pending(
        self, messages: Sequence[tuple[str, bytes]], states: Sequence[TaskState], ttl: int
    ) -> None:
        by_queue: dict[str, list[bytes]] = defaultdict(list)
        for queue, body in messages:
            by_queue[queue].append(body)
        keys: list[Any] = [state.task_uuid for state in states]
        args: list[Any] = [ttl, len(states), *(state.encode() for state in states)]
        for queue, bodies in by_queue.items():
            keys.append(queue)
            args += (len(bodies), *bodies)
        await self.connector.run(_SEND, keys, args)

    async def _push_prioritized(self, messages: Sequence[tuple[str, bytes, int]]) -> None:
        by_queue: dict[str, list[Any]] = defaultdict(list)
        for queue, body, priority in messages:
            by_queue[queue] += (priority, body)
        connector = self.connector
        await asyncio.gather(*(connector.run(_PUSH_PRIORITIZED, [queue], args) for queue, args in by_queue.items()))

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        mapping: dict[bytes, float] = {}
        for signature, body in messages:
            assert signature.eta is not None
            mapping[body] = float(unix_ns(signature.eta))
        args = [item for body, score in mapping.items() for item in (score, body)]
        await self.connector.batched().execute("ZADD", self.delayed_key, *args)

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        self.connector.tag("machinery:processing:", queue)  # refuses a queue no tag can follow on a cluster
        consumer = RedisConsumer(self, queue, f"{consumer_tag}:{uuid.uuid4().hex[:8]}")
        await consumer.start()
        return consumer

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        bodies: list[Any] = await self.connector.client().lrange(queue or self.config.default_queue, 0, -1)
        return decode_all(bodies)

    async def get_delayed_tasks(self) -> list[Signature]:
        bodies: list[Any] = await self.connector.client().zrange(self.delayed_key, 0, -1)
        return decode_all(bodies)

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        raw: list[bytes] = await self.connector.client().lrange(  # type: ignore[assignment]  # no decode_responses
            dead_key(queue or self.config.default_queue), 0, -1
        )
        return [DeadLetter.from_bytes(item) for item in raw]

    async def requeue_dead(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        return int(await self.connector.run(_REQUEUE_DEAD, [dead_key(name), name], []))

    async def queue_depth(self, queue: str | None = None) -> int:
        return int(await self.connector.client().llen(queue or self.config.default_queue))

    async def dead_count(self, queue: str | None = None) -> int:
        return int(await self.connector.client().llen(dead_key(queue or self.config.default_queue)))

    async def purge(self, queue: str | None = None) -> int:
        return await self._take_all(queue or self.config.default_queue)

    async def purge_dead(self, queue: str | None = None) -> int:
        return await self._take_all(dead_key(queue or self.config.default_queue))

    async def _take_all(self, key: str) -> int:
        """Delete the list ``key``, returning its length, in one transaction (a message pushed
        between a count and a delete would be lost uncounted)."""
        pipeline = self.connector.client().pipeline(transaction=True)
        pipeline.llen(key)
        pipeline.delete(key)
        length, _ = await pipeline.execute()
        return int(length)

    async def ping(self) -> None:
        await self.connector.client().ping()

    async def delete_queue(self, queue: str) -> None:
        await self.connector.client().delete(queue, dead_key(queue))

    async def close(self) -> None:
        await self.connector.close()

    async def close_loop_connections(self) -> None:
        await self.connector.close()


class RedisConsumer(Consumer):
    """One worker's processing list, heartbeat, reaper and delayed mover on one queue."""

    def __init__(self, broker: RedisBroker, queue: str, consumer_id: str) -> None:
        self.broker = broker
        self.queue = queue
        self.consumer_id = consumer_id
        self.processing = processing_prefix(queue) + consumer_id
        self._heartbeats = heartbeats_key(queue)
        self._background: list[asyncio.Task[None]] = []
        self._timeout = broker.config.heartbeat_timeout
        # Fetch scripts sent or queued in the auto-pipeline; they run even if the fetch
        # awaiting them is cancelled, so close() waits for them before giving messages back.
        self._taking: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        await self._beat()
        await self._reap()
        self._background = [
            asyncio.ensure_future(self._keep_alive()),
            asyncio.ensure_future(self._move_delayed()),
        ]

    # ------------------------------------------------------------------ taking

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        connector = self.broker.connector
        if timeout is None:
            timeout = max(0.05, self.broker.config.redis.normal_tasks_poll_period / 1000)
        taking = connector.run(_FETCH, [self.queue, self.processing], [max_count])
        self._taking.add(taking)
        taking.add_done_callback(self._taking.discard)
        bodies = await asyncio.shield(taking)
        if not bodies and timeout > 0:  # (BLMOVE would read a zero timeout as "forever")
            # Block for the first message (on a connection of its own: a blocking command
            # must not sit in a shared pipeline); more are taken by the next fetch.
            # redis-py types the timeout as int; Redis takes fractions of a second.
            wait: Any = timeout
            body = await connector.client().blmove(self.queue, self.processing, wait, "LEFT", "RIGHT")
            if body is None:
                return []
            bodies = [body]
        return [Delivery(body, self.queue) for body in bodies]

    async def ack(self, delivery: Delivery) -> None:
        await self.broker.connector.batched().execute("LREM", self.processing, 1, delivery.body)

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delay > 0:
            due = time.time_ns() + int(delay * 1e9)
            connector, delayed_key = self.broker.connector, self.broker.delayed_key
            if connector.same_slot(self.processing, delayed_key):
                await connector.run(_DEFER, [self.processing, delayed_key], [delivery.body, due])
            else:
                await defer_in_steps(connector, self.processing, delayed_key, delivery.body, due)
            return
        await self.broker.connector.run(_SETTLE, [self.processing, self.queue], [delivery.body, delivery.body])

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        letter = DeadLetter.now(self.queue, reason, delivery.body).to_bytes()
        await self.broker.connector.run(_SETTLE, [self.processing, dead_key(self.queue)], [delivery.body, letter])

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # A cancelled fetch's script may still be on its way: let it land first, or it would
        # move messages into this processing list after the release, with no heartbeat left
        # for a reaper to find them by.
        await asyncio.gather(*self._taking, return_exceptions=True)
        expires_ms = int((time.time() + RELEASED_HEARTBEAT_GRACE) * 1000)
        returned = await self.broker.connector.run(
            _RELEASE,
            [self.processing, self.queue, self._heartbeats],
            [self.consumer_id, expires_ms, processing_prefix(self.queue)],
        )
        if returned:
            log.logger.info("Returned %d unfinished message(s) to %r", returned, self.queue)

    # ------------------------------------------------------------------ background duties

    async def _beat(self) -> None:
        deadline_ms = int((time.time() + self._timeout) * 1000)
        await self.broker.connector.run(_BEAT, [self._heartbeats], [self.consumer_id, deadline_ms])

    async def _reap(self) -> None:
        returned = await self.broker.connector.run(
            _REAP, [self._heartbeats, self.queue], [int(time.time() * 1000), processing_prefix(self.queue)]
        )
        if returned:
            log.logger.warning(
                "Returned %d message(s) taken by worker(s) that stopped sending heartbeats to %r", returned, self.queue
            )

    async def _keep_alive(self) -> None:
        interval = self._timeout / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._beat()
                await self._reap()
            except Exception as exc:  # the connection will come back; the worker logs fetch errors
                log.logger.debug("heartbeat failed: %s", exc)

    async def _move_due(self) -> tuple[int, Any]:
        """Move a batch of due delayed messages: one script off a cluster, steps on one."""
        broker = self.broker
        now, queue = time.time_ns(), broker.config.default_queue
        if broker.connector.cluster:
            return await move_due_in_steps(broker.connector, broker.delayed_key, now, DELAYED_BATCH, queue)
        moved, next_score = await broker.connector.run(_MOVE_DUE, [broker.delayed_key], [now, DELAYED_BATCH, queue])
        return int(moved), next_score

    async def _move_delayed(self) -> None:
        period = (self.broker.config.redis.delayed_tasks_poll_period or 500) / 1000
        while True:
            sleep = period
            try:
                moved, next_score = await self._move_due()
                if int(moved) >= DELAYED_BATCH:
                    continue
                if next_score is not None:
                    sleep = min(period, max(0.0, (float(next_score) - time.time_ns()) / 1e9))
            except Exception as exc:
                log.logger.debug("delayed-task mover failed: %s", exc)
            await asyncio.sleep(sleep)


__all__ = ["RedisBroker", "RedisConsumer"]
