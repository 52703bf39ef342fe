"""The DynamoDB lock: Go's lock semantics with conditional writes, in the group metadata table.

Each key is an item ``machinery:lock:<key>`` of ``DynamoDBConfig.group_metas_table`` (Go has no
DynamoDB lock; these items sit beside its groups and expire through the table's ``TTL``).
Every operation is one conditional write, or an optimistic read-then-conditional-write that
tries again when someone else wrote first, so two processes never both win.
"""

from __future__ import annotations

import time
from typing import Any

from botocore.exceptions import ClientError

from .._drivers import dynamodb as items
from .._drivers.aws import error_code
from ..config import Config
from .base import Lock, next_turn, now_ns

PREFIX = items.CONTROL_PREFIX + "lock:"
_FAILED = "ConditionalCheckFailedException"


class DynamoDBLock(Lock):
    """Periodic-task locks, unique-task claims and rate-limit turns in DynamoDB items."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.clients = items.dynamodb_clients(config, url)
        self.table = config.dynamodb.group_metas_table
        self._checked = False

    async def _update(self, key: str, expression: str, condition: str, values: dict[str, Any]) -> bool:
        """One conditional UpdateItem on the key's item; False when the condition failed."""
        if not self._checked:
            await items.check_tables(self.clients, self.config.dynamodb)
            self._checked = True
        async with self.clients.call(f"updating lock {key!r}") as db:
            try:
                await db.update_item(
                    TableName=self.table,
                    Key={"GroupUUID": items.s(PREFIX + key)},
                    UpdateExpression=expression,
                    ConditionExpression=condition,
                    ExpressionAttributeValues=values,
                    **({"ExpressionAttributeNames": {"#TTL": "TTL"}} if "#TTL" in expression else {}),
                )
            except ClientError as exc:
                if error_code(exc) == _FAILED:
                    return False
                raise
        return True

    async def _read(self, key: str) -> dict[str, Any]:
        async with self.clients.call(f"reading lock {key!r}") as db:
            response = await db.get_item(
                TableName=self.table, Key={"GroupUUID": items.s(PREFIX + key)}, ConsistentRead=True
            )
        item: dict[str, Any] = response.get("Item") or {}
        return item

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        return await self._update(
            key,
            "SET Deadline = :d, #TTL = :e",
            "attribute_not_exists(Deadline) OR Deadline < :now",
            {":d": items.n(deadline_ns), ":e": items.n(deadline_ns // 10**9 + 1), ":now": items.n(now_ns())},
        )

    async def claim(self, key: str, value: str, seconds: float) -> str | None:
        while True:
            until = now_ns() + int(seconds * 1e9)
            taken = await self._update(
                key,
                "SET ClaimValue = :v, ClaimUntil = :u, #TTL = :e",
                "attribute_not_exists(ClaimUntil) OR ClaimUntil < :now",
                {
                    ":v": items.s(value),
                    ":u": items.n(until),
                    ":e": items.n(until // 10**9 + 1),
                    ":now": items.n(now_ns()),
                },
            )
            if taken:
                return None
            item = await self._read(key)
            if int(item.get("ClaimUntil", {}).get("N", "0")) > now_ns():
                return str(item.get("ClaimValue", {}).get("S", ""))
            # it expired between the two requests: try to take it again

    async def release(self, key: str, value: str) -> bool:
        return await self._update(
            key,
            "REMOVE ClaimValue, ClaimUntil",
            "ClaimValue = :v AND ClaimUntil > :now",
            {":v": items.s(value), ":now": items.n(now_ns())},
        )

    async def take_turn(self, key: str, interval: float, burst: int) -> float:
        while True:
            item = await self._read(key)
            stored = item.get("Arrival", {}).get("N")
            wait, arrival = next_turn(None if stored is None else float(stored), time.time(), interval, burst)
            values = {":a": {"N": repr(arrival)}, ":e": items.n(int(arrival) + 1)}
            if stored is None:
                condition = "attribute_not_exists(Arrival)"
            else:
                condition, values[":old"] = "Arrival = :old", {"N": stored}
            if await self._update(key, "SET Arrival = :a, #TTL = :e", condition, values):
                return wait

    async def close(self) -> None:
        await self.clients.close()

    async def close_loop_connections(self) -> None:
        await self.clients.close()
