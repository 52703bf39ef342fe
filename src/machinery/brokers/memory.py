"""An in-process broker: the reference implementation the unit tests run on.

Everything lives in this process (``memory://name`` selects a named store), guarded for use
from several threads and event loops at once. Delivery semantics match the real brokers:
a consumer leases what it takes and renews the lease while it lives; a message leaves only
by ack, requeue or dead letter; ``close`` returns unsettled messages to the head of the
queue, and the messages of a consumer that stopped renewing (its loop died) go back once
its lease (``heartbeat_timeout``) runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from .. import log
from ..config import Config
from ..signature import Signature
from ..types import unix_ns
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

#: How long a fetch waits for a message when the worker leaves it to the broker.
POLL_SECONDS = 1.0


@dataclass(slots=True)
class _Lease:
    queue: str
    body: bytes
    owner: int
    expires: float  # time.monotonic()
    priority: int = 0


class _Queue:
    """One queue's messages by priority lane; taken highest priority first, FIFO within one."""

    def __init__(self) -> None:
        # priority -> (sequence, body); only lanes that hold messages (an emptied one goes).
        self._lanes: dict[int, deque[tuple[int, bytes]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _lane(self, priority: int) -> deque[tuple[int, bytes]]:
        lane = self._lanes.get(priority)
        if lane is None:
            lane = self._lanes[priority] = deque()
        return lane

    def append(self, sequence: int, body: bytes, priority: int = 0) -> None:
        self._lane(priority).append((sequence, body))
        self._size += 1

    def appendleft(self, sequence: int, body: bytes, priority: int = 0) -> None:
        self._lane(priority).appendleft((sequence, body))
        self._size += 1

    def popleft(self) -> tuple[int, bytes, int]:
        lanes = self._lanes
        priority = next(iter(lanes)) if len(lanes) == 1 else max(lanes)
        lane = lanes[priority]
        sequence, body = lane.popleft()
        if not lane:
            del lanes[priority]
        self._size -= 1
        return sequence, body, priority

    def bodies(self) -> list[bytes]:
        """In the order they would be taken."""
        return [body for priority in sorted(self._lanes, reverse=True) for _, body in self._lanes[priority]]


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    queues: dict[str, _Queue] = field(default_factory=dict)
    delayed: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    dead: dict[str, list[DeadLetter]] = field(default_factory=dict)
    leases: dict[int, _Lease] = field(default_factory=dict)  # by sequence number
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue()
        return queue

    def append(self, name: str, body: bytes, priority: int = 0) -> None:
        """Put a message at the back of a queue's lane; call with ``lock`` held."""
        self.queue(name).append(next(self.seq), body, priority)

    def give_back(self, sequences: Sequence[int]) -> int:
        """Return leased messages to the head of their lanes, oldest first; call with ``lock`` held."""
        returned = [(s, self.leases.pop(s)) for s in sorted(sequences, reverse=True) if s in self.leases]
        for sequence, lease in returned:
            self.queue(lease.queue).appendleft(sequence, lease.body, lease.priority)
        return len(returned)

    def wake(self) -> None:
        """Wake every waiting consumer; call with ``lock`` held."""
        waiters, self.waiters = self.waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def release_due(self) -> float | None:
        """Move due delayed messages to their queues and expired leases back to theirs;
        return seconds until the next such event. Call with ``lock`` held."""
        expired = [s for s, lease in self.leases.items() if lease.expires <= time.monotonic()]
        if expired:
            log.logger.warning("Returned %d message(s) taken by a consumer that stopped renewing", len(expired))
            self.give_back(expired)
        now = time.time_ns()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, queue, body = heapq.heappop(self.delayed)
            self.append(queue, body)
        moments = [(self.delayed[0][0] - now) / 1e9] if self.delayed else []
        if self.leases:
            moments.append(min(lease.expires for lease in self.leases.values()) - time.monotonic())
        return min(moments) if moments else None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MemoryBroker(Broker):
    """Queues in this process's memory; ``memory://`` URLs with the same name share them."""

    idle_loop_ok = True  # nothing to keep up between calls

    _stores: ClassVar[dict[str, _Store]] = {}
    _stores_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        with self._stores_lock:
            self._store = self._stores.setdefault(url, _Store())

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        store = self._store
        with store.lock:
            for queue, body in messages:
                store.append(queue, body)
            store.wake()

    async def _push_prioritized(self, messages: Sequence[tuple[str, bytes, int]]) -> None:
        store = self._store
        with store.lock:
            for queue, body, priority in messages:
                store.append(queue, body, priority)
            store.wake()

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        store = self._store
        with store.lock:
            for signature, body in messages:
                assert signature.eta is not None
                heapq.heappush(store.delayed, (unix_ns(signature.eta), next(store.seq), signature.routing_key, body))
            store.wake()

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        return _MemoryConsumer(self._store, queue, self.config.heartbeat_timeout)

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        with self._store.lock:
            bodies = self._store.queue(queue or self.config.default_queue).bodies()
        return decode_all(bodies)

    async def get_delayed_tasks(self) -> list[Signature]:
        with self._store.lock:
            bodies = [body for *_, body in sorted(self._store.delayed)]
        return decode_all(bodies)

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        with self._store.lock:
            return list(self._store.dead.get(queue or self.config.default_queue, []))

    async def requeue_dead(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        with self._store.lock:
            letters = self._store.dead.pop(name, [])
            for letter in letters:
                self._store.append(name, letter.body)
            self._store.wake()
        return len(letters)

    async def queue_depth(self, queue: str | None = None) -> int:
        with self._store.lock:
            return len(self._store.queue(queue or self.config.default_queue))

    async def dead_count(self, queue: str | None = None) -> int:
        with self._store.lock:
            return len(self._store.dead.get(queue or self.config.default_queue, []))

    async def delayed_count(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        with self._store.lock:
            return sum(1 for _, _, q, _ in self._store.delayed if q == name)

    async def purge(self, queue: str | None = None) -> int:
        with self._store.lock:
            removed = self._store.queues.pop(queue or self.config.default_queue, None)
        return len(removed) if removed is not None else 0

    async def purge_dead(self, queue: str | None = None) -> int:
        with self._store.lock:
            return len(self._store.dead.pop(queue or self.config.default_queue, []))

    async def ping(self) -> None:
        """Always answers: the store is this process's memory."""

    async def delete_queue(self, queue: str) -> None:
        with self._store.lock:
            self._store.queues.pop(queue, None)
            self._store.dead.pop(queue, None)


class _MemoryConsumer(Consumer):
    """One consumer's leases; ``receipt`` is the message's sequence number."""

    _owners: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(self, store: _Store, queue: str, lease_seconds: float) -> None:
        self._store = store
        self.queue = queue
        self._owner = next(self._owners)
        self._lease_seconds = lease_seconds
        self._renewer = asyncio.ensure_future(self._renew_forever())

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        deadline = time.monotonic() + (POLL_SECONDS if timeout is None else timeout)
        store = self._store
        while True:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            with store.lock:
                next_due = store.release_due()
                queue = store.queue(self.queue)
                if queue:
                    taken: list[Delivery] = []
                    expires = time.monotonic() + self._lease_seconds
                    while queue and len(taken) < max_count:
                        sequence, body, priority = queue.popleft()
                        store.leases[sequence] = _Lease(self.queue, body, self._owner, expires, priority)
                        taken.append(Delivery(body, self.queue, sequence))
                    return taken
                store.waiters.append((loop, future))
            wait = deadline - time.monotonic()
            if next_due is not None:
                wait = min(wait, max(0.001, next_due))
            if wait <= 0:
                return []
            try:
                await asyncio.wait_for(future, wait)
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    return []

    def _take_lease(self, delivery: Delivery) -> _Lease | None:
        """Remove this consumer's lease on ``delivery``; call with the store's lock held."""
        lease = self._store.leases.get(delivery.receipt)
        if lease is None or lease.owner != self._owner:
            return None  # it expired and went back to the queue meanwhile
        return self._store.leases.pop(delivery.receipt)

    async def ack(self, delivery: Delivery) -> None:
        with self._store.lock:
            self._take_lease(delivery)

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        store = self._store
        with store.lock:
            lease = self._take_lease(delivery)
            if lease is None:
                return
            if delay > 0:
                due = time.time_ns() + int(delay * 1e9)
                heapq.heappush(store.delayed, (due, next(store.seq), self.queue, lease.body))
            else:
                store.append(self.queue, lease.body)
            store.wake()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        store = self._store
        with store.lock:
            if self._take_lease(delivery) is not None:
                store.dead.setdefault(self.queue, []).append(DeadLetter.now(self.queue, reason, delivery.body))

    async def close(self) -> None:
        self._renewer.cancel()
        await asyncio.gather(self._renewer, return_exceptions=True)
        store = self._store
        with store.lock:
            # What was taken but never settled goes back to the head of the queue, oldest first.
            if store.give_back([s for s, lease in store.leases.items() if lease.owner == self._owner]):
                store.wake()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            expires = time.monotonic() + self._lease_seconds
            with self._store.lock:
                for lease in self._store.leases.values():
                    if lease.owner == self._owner:
                        lease.expires = expires
