"""The Redis Cluster harness: broker, backend and lock on a 6-node cluster of our own.

The inspection is the Redis harness's, through the server's own connector: on a cluster that
client routes each key to its slot's node and scans every primary. Only cleaning up differs:
it goes to the deployment, not to the shared Redis, and key by key (each in its own slot).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import RedisConfig, Server
from machinery.backends.redis import annotation_key
from machinery.brokers.redis import dead_key, heartbeats_key

from .redis import ANNOTATIONS, RedisHarness


class RedisDeploymentHarness(RedisHarness):
    """A Redis deployment the tests start themselves (``deployment`` set by ``setup``)."""

    deployment: Any

    def url(self, queue: str) -> str:
        return str(self.deployment.url)

    def topology(self) -> dict[str, Any]:
        """The RedisConfig fields that choose the topology."""
        return {}

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {
            "redis": RedisConfig(
                delayed_tasks_key=f"{queue}_delayed",
                normal_tasks_poll_period=200,
                delayed_tasks_poll_period=100,
                **self.topology(),
            )
        }

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        """Delete the queue's keys and the states of ``ids``, then check nothing of the test's
        own is left without a TTL."""
        client: Any = self._broker(server).connector.client()
        keys: list[Any] = [queue, f"{queue}_delayed", dead_key(queue), heartbeats_key(queue)]
        keys += await self._processing_lists(client, queue)
        for task_uuid in ids:
            keys += [task_uuid, *(annotation_key(task_uuid, name) for name in ANNOTATIONS)]
        for key in keys:  # one by one: on a cluster they live in different slots
            await client.delete(key)
        left = [key async for key in client.scan_iter(match=f"*{queue}*", count=10_000)]
        forever = [key for key in left if await client.ttl(key) == -1]
        for key in left:
            await client.delete(key)
        assert not forever, f"the test left Redis keys without a TTL: {forever}"


class RedisClusterHarness(RedisDeploymentHarness):
    name: ClassVar[str] = "redis-cluster"

    def setup(self) -> None:
        self.deployment = self.request.getfixturevalue("redis_cluster_deployment")

    def topology(self) -> dict[str, Any]:
        return {"cluster_enabled": True}
