"""The Redis Sentinel harness: broker, backend and lock on the primary three Sentinels watch."""

from __future__ import annotations

from machinery import RedisConfig
from support.redis_topologies import MASTER_NAME, RedisSentinelDeployment

from .redis_cluster import RedisDeploymentHarness


class RedisSentinelHarness(RedisDeploymentHarness):
    name = "redis-sentinel"

    def setup(self) -> None:
        self.deployment: RedisSentinelDeployment = self.request.getfixturevalue("redis_sentinel_deployment")

    def redis_config(self, queue: str) -> RedisConfig:
        config = super().redis_config(queue)
        config.master_name = MASTER_NAME
        return config
