"""The MongoDB harness: the result backend on ``MACHINERY_TEST_MONGO_URL``, a database per test,
paired with its companion (the shared Redis) as broker and lock. Without the variable it skips
with the reason, under CI too: no MongoDB server can be installed on this project's machines."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, ClassVar

import pytest

from machinery import MongoDBConfig, Server

from .base import Harness

MONGO_URL = os.environ.get("MACHINERY_TEST_MONGO_URL", "")


class MongoHarness(Harness):
    name: ClassVar[str] = "mongo"
    broker: ClassVar[bool] = False
    lock: ClassVar[bool] = False
    companion: ClassVar[str] = "redis"

    def setup(self) -> None:
        if not MONGO_URL:
            pytest.skip("MACHINERY_TEST_MONGO_URL is not set: no MongoDB server to test against")

    def url(self, queue: str) -> str:
        return MONGO_URL

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {"mongodb": MongoDBConfig(database=f"mt_{queue[-24:]}")}

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        backend: Any = server.backend
        document = await backend._collection("tasks").find_one({"_id": task_uuid})
        if document is None:
            return None
        if "delete_at" not in document:
            return float("inf")  # as in Go, only finished tasks expire
        return float((document["delete_at"] - datetime.now(timezone.utc)).total_seconds())

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        backend: Any = server.backend
        await backend._loops.get().client.drop_database(backend._database)
