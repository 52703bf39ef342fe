"""The Redis Sentinel harness: broker, backend and lock on the primary three Sentinels watch
(passwords on both), found through the Sentinels."""

from __future__ import annotations

from typing import Any, ClassVar

from support.redis_topologies import MASTER_NAME, SENTINEL_PASSWORD

from .redis_cluster import RedisDeploymentHarness


class RedisSentinelHarness(RedisDeploymentHarness):
    name: ClassVar[str] = "redis-sentinel"

    def setup(self) -> None:
        self.deployment = self.request.getfixturevalue("redis_sentinel_deployment")

    def topology(self) -> dict[str, Any]:
        return {"master_name": MASTER_NAME, "sentinel_password": SENTINEL_PASSWORD}
