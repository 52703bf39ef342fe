"""Redis (the shared server) as broker, result backend and lock, in Go Machinery's keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from redis.asyncio import Redis

from machinery import Server
from machinery.backends.redis import RedisBackend, annotation_key
from machinery.brokers.base import Consumer
from machinery.brokers.redis import RedisBroker, dead_key, heartbeats_key, processing_prefix

from ..services import REDIS_URL, require_redis
from .base import Harness

#: Names beside a task's state: what the backend keeps per task UUID (see annotation_key).
ANNOTATIONS = ("traceback", "progress", "rate")


class RedisHarness(Harness):
    name: ClassVar[str] = "redis"
    marks: ClassVar[tuple[str, ...]] = ("redis",)

    def setup(self) -> None:
        require_redis()

    def url(self, queue: str) -> str:
        return REDIS_URL

    @staticmethod
    def _broker(server: Server) -> RedisBroker:
        assert isinstance(server.broker, RedisBroker)
        return server.broker

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        bodies = await self._broker(server).connector.client().lrange(queue, 0, -1)
        return [body if isinstance(body, bytes) else body.encode() for body in bodies]

    @staticmethod
    async def _processing_lists(client: Any, queue: str) -> list[str]:
        # Every consumer holding messages is in the heartbeat set until it is reaped or closes,
        # so its list is found by name (a SCAN would walk the whole shared keyspace).
        consumers: list[bytes | str] = await client.zrange(heartbeats_key(queue), 0, -1)
        return [processing_prefix(queue) + (c.decode() if isinstance(c, bytes) else c) for c in consumers]

    async def taken_count(self, server: Server, queue: str) -> int:
        client = self._broker(server).connector.client()
        return sum([await client.llen(key) for key in await self._processing_lists(client, queue)])

    def abandon(self, consumer: Consumer) -> None:
        # A SIGKILLed worker sends no more heartbeats: another consumer's reaper takes its list back.
        for task in consumer._background:  # type: ignore[attr-defined]
            task.cancel()

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        assert isinstance(server.backend, RedisBackend)
        milliseconds = await server.backend.connector.client().pttl(task_uuid)
        return None if milliseconds == -2 else (float("inf") if milliseconds == -1 else milliseconds / 1000)

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        """Delete the queue's keys and the states of ``ids``, then check nothing of the test's
        own is left: every key still naming the queue would live on without a TTL."""
        client = Redis.from_url(REDIS_URL)
        try:
            keys: list[str | bytes] = [
                queue,
                f"{queue}_delayed",
                dead_key(queue),
                heartbeats_key(queue),
                server.config.redis.delayed_tasks_key,
            ]
            keys += await self._processing_lists(client, queue)
            for task_uuid in ids:
                keys += [task_uuid, *(annotation_key(task_uuid, name) for name in ANNOTATIONS)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
            left = [key async for key in client.scan_iter(match=f"*{queue}*", count=10_000)]
            forever = [key for key in left if await client.ttl(key) == -1]
            if left:
                await client.delete(*left)
            assert not forever, f"the test left Redis keys without a TTL: {forever}"
        finally:
            await client.aclose()
