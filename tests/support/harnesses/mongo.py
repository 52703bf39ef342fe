"""The MongoDB harness: the result backend on ``MACHINERY_TEST_MONGO_URL`` (skipped with the
reason when it is not set, under CI too: no MongoDB server can be installed on this project's
machines), with the shared Redis as broker and lock."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, ClassVar

import pytest

from conftest import REDIS_URL, require_service
from machinery import Config, MongoDBConfig, Server

from .base import make_config
from .memcache import _BrokerSide, _SharedRedis
from .redis_cluster import RedisDeploymentHarness

MONGO_URL = os.environ.get("MACHINERY_TEST_MONGO_URL", "")


class MongoHarness(RedisDeploymentHarness):
    name = "mongo"
    broker: ClassVar[bool] = False
    lock: ClassVar[bool] = False

    def setup(self) -> None:
        if not MONGO_URL:
            pytest.skip("MACHINERY_TEST_MONGO_URL is not set: no MongoDB server to test against")
        require_service("Redis", REDIS_URL, 6379)
        self.deployment = _SharedRedis()

    def url(self, queue: str) -> str:
        return MONGO_URL

    def config(self, queue: str, **overrides: Any) -> Config:
        broker = _BrokerSide(self.request, self.tmp_path)
        fields = {"lock": REDIS_URL, "mongodb": MongoDBConfig(database=f"machinery_test_{queue}"), **overrides}
        return make_config(queue, broker=broker, backend=self, **fields)

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        backend: Any = server.backend
        document = await backend._collection("tasks").find_one({"_id": task_uuid})
        if document is None:
            return None
        if "delete_at" not in document:
            pytest.skip("MongoDB expires only finished tasks (through delete_at), as Go's backend does")
        return float((document["delete_at"] - datetime.now(timezone.utc)).total_seconds())

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        await super().cleanup(server, queue, [])
        backend: Any = server.backend
        await backend._loops.get().client.drop_database(backend._database)
