"""The in-process driver: ``memory://<queue>`` broker, result backend and lock."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import Server
from machinery.backends.memory import MemoryBackend
from machinery.brokers.base import Consumer
from machinery.brokers.memory import MemoryBroker

from .base import Harness


class MemoryHarness(Harness):
    name: ClassVar[str] = "memory"
    shared_across_processes: ClassVar[bool] = False

    def url(self, queue: str) -> str:
        return f"memory://{queue}"

    def _broker(self, server: Server) -> Any:
        assert isinstance(server.broker, MemoryBroker)
        return server.broker._store

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        store = self._broker(server)
        with store.lock:
            return list(store.queue(queue).bodies())

    async def taken_count(self, server: Server, queue: str) -> int:
        store = self._broker(server)
        with store.lock:
            return sum(1 for lease in store.leases.values() if lease.queue == queue)

    def abandon(self, consumer: Consumer) -> None:
        # What a dead event loop leaves: leases nobody renews, which run out after heartbeat_timeout.
        consumer._renewer.cancel()  # type: ignore[attr-defined]

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        assert isinstance(server.backend, MemoryBackend)
        store = server.backend._store
        with store.lock:
            entry = store.states.get(task_uuid)
        return None if entry is None else entry[0] - time.monotonic()

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        # Each test has stores of its own (named by its queue): forget them whole.
        url = self.url(queue)
        MemoryBroker._stores.pop(url, None)
        MemoryBackend._stores.pop(url, None)
