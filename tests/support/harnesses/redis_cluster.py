"""The Redis Cluster harness: broker, backend and lock on a 6-node cluster of our own.

The broker-side inspection goes through the server's own connector, so the same code serves
every Redis topology (the Sentinel harness reuses it): on a cluster that client routes each
key to its slot's node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import RedisConfig, Server
from machinery.brokers.base import Consumer
from machinery.brokers.redis import RedisConsumer, dead_key, heartbeats_key, processing_prefix
from support.redis_topologies import RedisClusterDeployment

from .base import Harness


class RedisDeploymentHarness(Harness):
    """What every Redis topology shares: Go's lists and our keys, inspected by the server's client."""

    marks: ClassVar[tuple[str, ...]] = ("redis",)
    deployment: Any

    def redis_config(self, queue: str) -> RedisConfig:
        return RedisConfig(
            delayed_tasks_key=f"{queue}_delayed", normal_tasks_poll_period=200, delayed_tasks_poll_period=100
        )

    def url(self, queue: str) -> str:
        return str(self.deployment.url)

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {"redis": self.redis_config(queue)}

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        return list(await server.broker.connector.client().lrange(queue, 0, -1))  # type: ignore[attr-defined]

    async def taken_count(self, server: Server, queue: str) -> int:
        client = server.broker.connector.client()  # type: ignore[attr-defined]
        consumers = await client.zrange(heartbeats_key(queue), 0, -1)
        return sum([await client.llen(processing_prefix(queue) + c.decode()) for c in consumers])

    def abandon(self, consumer: Consumer) -> None:
        assert isinstance(consumer, RedisConsumer)
        for task in consumer._background:  # its heartbeat stops; its processing list stays
            task.cancel()

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        milliseconds = await server.backend.connector.client().pttl(task_uuid)  # type: ignore[attr-defined]
        return None if milliseconds < 0 else milliseconds / 1000

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        client = server.broker.connector.client()  # type: ignore[attr-defined]
        consumers = await client.zrange(heartbeats_key(queue), 0, -1)
        keys = [queue, f"{queue}_delayed", dead_key(queue), heartbeats_key(queue)]
        keys += [processing_prefix(queue) + c.decode() for c in consumers]
        for key in [*keys, *ids]:  # one by one: they live in different slots on a cluster
            await client.delete(key)


class RedisClusterHarness(RedisDeploymentHarness):
    name = "redis-cluster"

    def setup(self) -> None:
        self.deployment: RedisClusterDeployment = self.request.getfixturevalue("redis_cluster_deployment")

    def redis_config(self, queue: str) -> RedisConfig:
        config = super().redis_config(queue)
        config.cluster_enabled = True
        return config
