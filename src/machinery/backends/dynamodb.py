"""The DynamoDB result backend: Go Machinery's tables and items (docs/wire.md §11.5).

Go and Python read each other's states and group metadata: the same tables, hash keys,
attribute names and types, PutItem for PENDING and UpdateItem for later states, and the
``TTL`` attribute (Unix seconds) for DynamoDB's expiry. What differs from Go:

- the chord trigger is one conditional UpdateItem (``ChordTriggered = false``), so exactly one
  caller sends the callback (Go's Lock spin can send it twice);
- every write sets ``TTL`` (Go sets it only on SUCCESS, FAILURE and groups, so unfinished
  tasks never expire);
- members' states are read with BatchGetItem and returned in group order, unprocessed keys
  retried (Go v2 drops them);
- annotations (traceback, progress) are attributes of the task's item beside Go's; the
  revocations and the worker records are items of the group table under ``machinery:`` keys.

Waiting polls with a consistent read every ``DynamoDBConfig.poll_interval`` seconds (a write
in the same process wakes its waiters at once): DynamoDB notifies nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from botocore.exceptions import ClientError

from .._drivers import dynamodb as items
from .._drivers.aws import CONNECTION_ERRORS, error_code
from ..config import Config
from ..state import COMPLETED_STATES, FAILURE, GroupMeta, TaskState, WorkerInfo
from .base import Backend, decode_workers, per_task

#: BatchGetItem takes at most 100 keys.
BATCH_GET = 100
REVOCATIONS_KEY = items.CONTROL_PREFIX + "revocations"
WORKERS_KEY = items.CONTROL_PREFIX + "workers"
_ANNOTATION = "MachineryAnnotation:"


class DynamoDBBackend(Backend):
    """Task states and group metadata in Go Machinery's two DynamoDB tables."""

    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (*Backend.connection_errors, *CONNECTION_ERRORS)
    unknown_state_hint: str = " (or the DynamoDB tables are not the ones the sender writes to)"

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.clients = items.dynamodb_clients(config, url)
        self.poll_interval = config.dynamodb.poll_interval
        self.states_table = config.dynamodb.task_states_table
        self.groups_table = config.dynamodb.group_metas_table
        self._checked = False

    async def _db(self, doing: str) -> Any:
        if not self._checked:
            await items.check_tables(self.clients, self.config.dynamodb)
            self._checked = True
        return self.clients.call(doing)

    # ------------------------------------------------------------------ task states

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        ttl = items.expires_at(self.config)

        async def write_in_order(group: list[TaskState]) -> None:
            for state in group:
                await self._write(state, keep_created, ttl)

        await asyncio.gather(*(write_in_order(group) for group in per_task(states)))
        for state in states:
            if state.state in COMPLETED_STATES:
                self._waiters.notify(state.task_uuid, state.encode())

    async def _write(self, state: TaskState, keep_created: bool, ttl: int) -> None:
        async with await self._db(f"writing the state of {state.task_uuid}") as db:
            if not keep_created:
                await db.put_item(TableName=self.states_table, Item=items.state_item(state, ttl))
                return
            # Go's UpdateItem shapes: State, then Error (FAILURE), TTL, Results (non-empty).
            clauses, names, values = ["#S = :s"], {"#S": "State"}, {":s": items.s(state.state)}
            if state.state == FAILURE:
                clauses.append("#E = :e")
                names["#E"], values[":e"] = "Error", items.s(state.error)
            clauses.append("#T = :t")
            names["#T"], values[":t"] = "TTL", items.n(ttl)
            if state.results:
                clauses.append("#R = :r")
                names["#R"], values[":r"] = "Results", items.results_value(state.results)
            if state.results is not None:  # [] too: Go leaves Results NULL, ours says "no results"
                clauses.append("#X = :x")
                names["#X"], values[":x"] = items.EXACT_RESULTS, items.exact_results(state.results)
            if state.task_name:  # a message sent without PENDING (by hand) still gets its name
                clauses.append("#N = if_not_exists(#N, :n)")
                names["#N"], values[":n"] = "TaskName", items.s(state.task_name)
            await db.update_item(
                TableName=self.states_table,
                Key={"TaskUUID": items.s(state.task_uuid)},
                UpdateExpression="SET " + ", ".join(clauses),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="UPDATED_NEW",
            )

    async def get_state(self, task_uuid: str) -> TaskState | None:
        item = await self._get_item(self.states_table, {"TaskUUID": items.s(task_uuid)}, f"the state of {task_uuid}")
        return None if item is None else items.state_from_item(item)

    async def _get_item(self, table: str, key: dict[str, Any], what: str) -> dict[str, Any] | None:
        """The item under ``key`` (a consistent read), or None."""
        async with await self._db(f"reading {what}") as db:
            response = await db.get_item(TableName=table, Key=key, ConsistentRead=True)
        item: dict[str, Any] | None = response.get("Item")
        return item

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        found: dict[str, TaskState] = {}
        unique = list(dict.fromkeys(task_uuids))
        for start in range(0, len(unique), BATCH_GET):
            for item in await self._batch_get(unique[start : start + BATCH_GET]):
                state = items.state_from_item(item)
                if state is not None:
                    found[state.task_uuid] = state
        return [found.get(u) for u in task_uuids]

    async def _batch_get(self, keys: list[str]) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            self.states_table: {"Keys": [{"TaskUUID": items.s(k)} for k in keys], "ConsistentRead": True}
        }
        got: list[dict[str, Any]] = []
        pause = 0.05
        async with await self._db("reading the states of a group") as db:
            while request:
                response = await db.batch_get_item(RequestItems=request)
                got += response.get("Responses", {}).get(self.states_table, [])
                request = response.get("UnprocessedKeys") or {}
                if request:  # throttled: try the rest again after a pause
                    await asyncio.sleep(pause)
                    pause = min(2.0, pause * 2)
        return got

    async def purge_state(self, task_uuid: str) -> None:
        async with await self._db(f"deleting the state of {task_uuid}") as db:
            await db.delete_item(TableName=self.states_table, Key={"TaskUUID": items.s(task_uuid)})

    # ------------------------------------------------------------------ groups

    async def write_group_meta(self, meta: GroupMeta) -> None:
        async with await self._db(f"writing group {meta.group_uuid}") as db:
            await db.put_item(TableName=self.groups_table, Item=items.group_item(meta, items.expires_at(self.config)))

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        item = await self._get_item(self.groups_table, {"GroupUUID": items.s(group_uuid)}, f"group {group_uuid}")
        return None if item is None else items.group_from_item(item)

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        async with await self._db(f"triggering the chord of group {group_uuid}") as db:
            try:
                await db.update_item(
                    TableName=self.groups_table,
                    Key={"GroupUUID": items.s(group_uuid)},
                    UpdateExpression="SET #CT = :t",
                    ConditionExpression="attribute_exists(#G) AND #CT = :f",
                    ExpressionAttributeNames={"#CT": "ChordTriggered", "#G": "GroupUUID"},
                    ExpressionAttributeValues={":t": {"BOOL": True}, ":f": {"BOOL": False}},
                )
            except ClientError as exc:
                if error_code(exc) == "ConditionalCheckFailedException":
                    return False
                raise
        return True

    async def purge_group_meta(self, group_uuid: str) -> None:
        async with await self._db(f"deleting group {group_uuid}") as db:
            await db.delete_item(TableName=self.groups_table, Key={"GroupUUID": items.s(group_uuid)})

    # ------------------------------------------------------------------ annotations

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        async with await self._db(f"annotating {task_uuid}") as db:
            await db.update_item(
                TableName=self.states_table,
                Key={"TaskUUID": items.s(task_uuid)},
                UpdateExpression="SET #A = :a, #T = :t",
                ExpressionAttributeNames={"#A": _ANNOTATION + name, "#T": "TTL"},
                ExpressionAttributeValues={":a": items.s(value), ":t": items.n(items.expires_at(self.config))},
            )

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        async with await self._db(f"reading the annotations of {task_uuid}") as db:
            response = await db.get_item(
                TableName=self.states_table,
                Key={"TaskUUID": items.s(task_uuid)},
                ConsistentRead=True,
                ProjectionExpression="#A",
                ExpressionAttributeNames={"#A": _ANNOTATION + name},
            )
        value = response.get("Item", {}).get(_ANNOTATION + name)
        return None if value is None else str(value["S"])

    # ------------------------------------------------------------------ revocations and workers

    async def _set_entry(self, key: str, attribute: str, entry: str, value: dict[str, Any], bump: bool) -> None:
        """Set ``attribute[entry]`` of a control item (creating the map first)."""
        async with await self._db(f"writing {key}") as db:
            await db.update_item(
                TableName=self.groups_table,
                Key={"GroupUUID": items.s(key)},
                UpdateExpression="SET #M = if_not_exists(#M, :empty)",
                ExpressionAttributeNames={"#M": attribute},
                ExpressionAttributeValues={":empty": {"M": {}}},
            )
            expression = "SET #M.#K = :v" + (" ADD #V :one" if bump else "")
            names = {"#M": attribute, "#K": entry, **({"#V": "Version"} if bump else {})}
            values = {":v": value, **({":one": items.n(1)} if bump else {})}
            await db.update_item(
                TableName=self.groups_table,
                Key={"GroupUUID": items.s(key)},
                UpdateExpression=expression,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )

    async def _remove_entries(self, key: str, attribute: str, entries: Sequence[str]) -> None:
        if not entries:
            return
        names = {"#M": attribute, **{f"#K{i}": e for i, e in enumerate(entries)}}
        async with await self._db(f"pruning {key}") as db:
            await db.update_item(
                TableName=self.groups_table,
                Key={"GroupUUID": items.s(key)},
                UpdateExpression="REMOVE " + ", ".join(f"#M.#K{i}" for i in range(len(entries))),
                ExpressionAttributeNames=names,
            )

    async def _control_item(self, key: str) -> dict[str, Any]:
        async with await self._db(f"reading {key}") as db:
            response = await db.get_item(
                TableName=self.groups_table, Key={"GroupUUID": items.s(key)}, ConsistentRead=True
            )
        item: dict[str, Any] = response.get("Item") or {}
        return item

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        until = int(time.time()) + self.ttl
        entry = {"M": {"Terminate": {"BOOL": terminate}, "Until": items.n(until)}}
        await self._set_entry(REVOCATIONS_KEY, "Revoked", task_uuid, entry, bump=True)

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        item = await self._control_item(REVOCATIONS_KEY)
        version = int(item.get("Version", {}).get("N", "0"))
        if version == since:
            return None
        now = time.time()
        live, expired = {}, []
        for task_uuid, value in item.get("Revoked", {}).get("M", {}).items():
            fields = value.get("M", {})
            if int(fields.get("Until", {}).get("N", "0")) > now:
                live[task_uuid] = bool(fields.get("Terminate", {}).get("BOOL", False))
            else:
                expired.append(task_uuid)
        await self._remove_entries(REVOCATIONS_KEY, "Revoked", expired[:50])
        return version, live

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        entry = {"M": {"Record": items.s(info.encode().decode()), "Until": {"N": f"{time.time() + ttl:.3f}"}}}
        await self._set_entry(WORKERS_KEY, "Workers", info.tag, entry, bump=False)

    async def forget_worker(self, tag: str) -> None:
        await self._remove_entries(WORKERS_KEY, "Workers", [tag])

    async def get_workers(self) -> list[WorkerInfo]:
        item = await self._control_item(WORKERS_KEY)
        now = time.time()
        live, expired = [], []
        for tag, value in item.get("Workers", {}).get("M", {}).items():
            fields = value.get("M", {})
            if float(fields.get("Until", {}).get("N", "0")) > now:
                live.append(str(fields.get("Record", {}).get("S", "")))
            else:
                expired.append(tag)
        await self._remove_entries(WORKERS_KEY, "Workers", expired[:50])
        return decode_workers(live)

    # ------------------------------------------------------------------ connections

    async def close(self) -> None:
        await self.clients.close()

    async def close_loop_connections(self) -> None:
        await self.clients.close()


__all__ = ["DynamoDBBackend"]
