"""The DynamoDB result backend and lock on DynamoDB Local (the broker comes from elsewhere)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import DynamoDBConfig, Server
from machinery._drivers.dynamodb import s
from machinery.backends.dynamodb import DynamoDBBackend

from ..cloud import LocalServer
from .base import Harness

#: Go's URL form; the requests go to DynamoDB Local through ``endpoint_url``.
URL = "https://dynamodb.us-east-1.amazonaws.com"
STATES_TABLE = "machinery_test_task_states"
GROUPS_TABLE = "machinery_test_group_metas"


class DynamoDBHarness(Harness):
    name: ClassVar[str] = "dynamodb"
    broker: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("sqs", "dynamodb")
    companion: ClassVar[str] = "sqs"

    def setup(self) -> None:
        self.server: LocalServer = self.request.getfixturevalue("dynamodb_local")

    def url(self, queue: str) -> str:
        return URL

    def config_overrides(self, queue: str) -> dict[str, Any]:
        section = DynamoDBConfig(
            task_states_table=STATES_TABLE,
            group_metas_table=GROUPS_TABLE,
            endpoint_url=self.server.url,
            create_tables=True,
            poll_interval=0.05,
        )
        return {"dynamodb": section}

    @staticmethod
    def backend_of(server: Server) -> DynamoDBBackend:
        assert isinstance(server.backend, DynamoDBBackend)
        return server.backend

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        backend = self.backend_of(server)
        async with await backend._db("reading a TTL") as db:
            response = await db.get_item(TableName=STATES_TABLE, Key={"TaskUUID": s(task_uuid)}, ConsistentRead=True)
        item = response.get("Item")
        if item is None:
            return None
        return float(item["TTL"]["N"]) - time.time()

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        backend = self.backend_of(server)
        for uuid in ids:
            await backend.purge_state(uuid)
            await backend.purge_group_meta(uuid)
