"""An in-process broker: the reference implementation the unit tests run on.

Everything lives in this process (``memory://name`` selects a named store), guarded for use
from several threads and event loops at once. Delivery semantics match the real brokers:
taken messages stay with their consumer until acked, and return to the queue on close.
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

from ..config import Config
from ..signature import Signature
from ..types import unix_ns
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

#: How long a fetch waits for a message when the worker leaves it to the broker.
POLL_SECONDS = 1.0


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    queues: dict[str, deque[bytes]] = field(default_factory=dict)
    delayed: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    dead: dict[str, list[DeadLetter]] = field(default_factory=dict)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def queue(self, name: str) -> deque[bytes]:
        return self.queues.setdefault(name, deque())

    def wake(self) -> None:
        """Wake every waiting consumer; call with ``lock`` held."""
        waiters, self.waiters = self.waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, future)

    def release_due(self) -> float | None:
        """Move due delayed messages to their queues; return seconds until the next one."""
        now = time.time_ns()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, queue, body = heapq.heappop(self.delayed)
            self.queue(queue).append(body)
        return (self.delayed[0][0] - now) / 1e9 if self.delayed else None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MemoryBroker(Broker):
    """Queues in this process's memory; ``memory://`` URLs with the same name share them."""

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
                store.queue(queue).append(body)
            store.wake()

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        store = self._store
        with store.lock:
            for signature, body in messages:
                assert signature.eta is not None
                heapq.heappush(store.delayed, (unix_ns(signature.eta), next(store.seq), signature.routing_key, body))
            store.wake()

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        return _MemoryConsumer(self._store, queue)

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        with self._store.lock:
            bodies = list(self._store.queue(queue or self.config.default_queue))
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
            self._store.queue(name).extend(letter.body for letter in letters)
            self._store.wake()
        return len(letters)


class _MemoryConsumer(Consumer):
    def __init__(self, store: _Store, queue: str) -> None:
        self._store = store
        self.queue = queue
        self._taken: dict[int, bytes] = {}
        self._ids = itertools.count()

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
                    while queue and len(taken) < max_count:
                        receipt = next(self._ids)
                        body = queue.popleft()
                        self._taken[receipt] = body
                        taken.append(Delivery(body, self.queue, receipt))
                    return taken
                store.waiters.append((loop, future))
            wait = deadline - time.monotonic()
            if next_due is not None:
                wait = min(wait, next_due)
            if wait <= 0:
                return []
            try:
                await asyncio.wait_for(future, wait)
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    return []

    async def ack(self, delivery: Delivery) -> None:
        self._taken.pop(delivery.receipt, None)

    async def requeue(self, delivery: Delivery) -> None:
        body = self._taken.pop(delivery.receipt, None)
        if body is not None:
            with self._store.lock:
                self._store.queue(self.queue).append(body)
                self._store.wake()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        body = self._taken.pop(delivery.receipt, delivery.body)
        with self._store.lock:
            self._store.dead.setdefault(self.queue, []).append(DeadLetter.now(self.queue, reason, body))

    async def close(self) -> None:
        with self._store.lock:
            # Return what was taken but never finished to the head of the queue, oldest first.
            self._store.queue(self.queue).extendleft(reversed(list(self._taken.values())))
            self._taken.clear()
            self._store.wake()
