"""The Memcache harness: the result backend on a memcached of our own, with the shared Redis
as broker and lock (memcached is a result backend only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from conftest import REDIS_URL, require_service
from machinery import Config, Server
from support.memcached import Memcached

from .base import make_config
from .redis_cluster import RedisDeploymentHarness


class _SharedRedis:
    url = REDIS_URL


class MemcacheHarness(RedisDeploymentHarness):
    """Broker-side methods are the Redis ones (its broker is the shared Redis)."""

    name = "memcache"
    broker: ClassVar[bool] = False
    lock: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("redis",)

    def setup(self) -> None:
        require_service("Redis", REDIS_URL, 6379)
        self.memcached: Memcached = self.request.getfixturevalue("memcached_server")
        self.deployment = _SharedRedis()

    def url(self, queue: str) -> str:
        return self.memcached.url

    def config(self, queue: str, **overrides: Any) -> Config:
        broker = _BrokerSide(self.request, self.tmp_path)
        return make_config(queue, broker=broker, backend=self, **{"lock": REDIS_URL, **overrides})

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        held = self.memcached.meta_get(task_uuid)
        return None if held is None else float(held[0])

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        await super().cleanup(server, queue, [])
        for uuid in ids:
            await server.backend.purge_state(uuid)
            await server.backend.purge_group_meta(uuid)


class _BrokerSide(RedisDeploymentHarness):
    """The shared Redis, as the broker of the memcache harness's configs."""

    name = "redis"

    def url(self, queue: str) -> str:
        return REDIS_URL
