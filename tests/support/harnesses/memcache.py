"""The Memcache harness: the result backend on a memcached of our own (the suite pairs it with
its companion, the shared Redis, as broker and lock: memcached is a result backend only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import Server

from .base import Harness


class MemcacheHarness(Harness):
    name: ClassVar[str] = "memcache"
    broker: ClassVar[bool] = False
    lock: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("redis",)
    companion: ClassVar[str] = "redis"

    def setup(self) -> None:
        self.memcached: Any = self.request.getfixturevalue("memcached_server")

    def url(self, queue: str) -> str:
        return str(self.memcached.url)

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        held = self.memcached.meta_get(task_uuid)
        # memcached's clock ticks once a second and may lag real time by up to a tick, so
        # the seconds it reports left can read one more than the expiry we set.
        return None if held is None else float(held[0]) - 1.0

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        for uuid in ids:  # states, group metadata and what is kept beside them expire anyway
            await server.backend.purge_state(uuid)
            await server.backend.purge_group_meta(uuid)
