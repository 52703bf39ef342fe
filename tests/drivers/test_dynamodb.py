"""What is specific to the DynamoDB backend and lock, on DynamoDB Local: Go's items attribute by
attribute, Go's ``%v`` result text both ways, the exactly-once chord trigger, the tables, and
the records machinery keeps beside Go's (annotations, revocations, workers, locks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from machinery import Config, ConfigError, DynamoDBConfig, GroupMeta, Server, TaskResult, TaskState
from machinery._drivers.dynamodb import from_go_text, go_text, s
from machinery._sync import run_sync
from machinery.backends.dynamodb import DynamoDBBackend
from machinery.locks.dynamodb import DynamoDBLock
from machinery.state import FAILURE, PENDING, STARTED, SUCCESS, WorkerInfo
from machinery.types import decode_results
from support.fixtures import unique
from support.harnesses.dynamodb import GROUPS_TABLE, STATES_TABLE, DynamoDBHarness

pytestmark = pytest.mark.dynamodb


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> DynamoDBHarness:
    harness = DynamoDBHarness(request, tmp_path)
    harness.setup()
    return harness


def make_config(harness: DynamoDBHarness, **section: Any) -> Config:
    fields = {**harness.config_overrides("q")["dynamodb"].__dict__, **section}
    return Config(broker="memory://dynamodb_tests", result_backend=harness.url("q"), dynamodb=DynamoDBConfig(**fields))


@pytest.fixture
def backend(harness: DynamoDBHarness) -> Iterator[DynamoDBBackend]:
    backend = DynamoDBBackend(make_config(harness), harness.url("q"))
    yield backend
    run_sync(backend.close())


async def raw_item(backend: DynamoDBBackend, table: str, key: str, value: str) -> dict[str, Any]:
    async with await backend._db("reading an item") as db:
        response = await db.get_item(TableName=table, Key={key: s(value)}, ConsistentRead=True)
    item: dict[str, Any] = response.get("Item", {})
    return item


def test_states_are_gos_items(backend: DynamoDBBackend) -> None:
    uuid = unique("task")
    created = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        await backend.write_states([TaskState(uuid, PENDING, "add", created_at=created)], False)
        pending = await raw_item(backend, STATES_TABLE, "TaskUUID", uuid)
        await backend.write_states([TaskState(uuid, STARTED)], True)
        results = [TaskResult("int64", 5), TaskResult("float64", 1234567), TaskResult("[]string", ["a", "b c"])]
        await backend.write_states([TaskState(uuid, SUCCESS, results=results)], True)
        success = await raw_item(backend, STATES_TABLE, "TaskUUID", uuid)
        state = await backend.get_state(uuid)
        assert state is not None
        return pending, success, {"state": state}

    pending, success, read = run_sync(scenario())
    ttl = int(pending.pop("TTL")["N"])
    assert ttl > time.time()  # every write refreshes the expiry
    assert pending == {  # initTaskState's PutItem, attribute by attribute
        "TaskUUID": {"S": uuid},
        "TaskName": {"S": "add"},
        "State": {"S": "PENDING"},
        "Results": {"NULL": True},
        "Error": {"S": ""},
        "CreatedAt": {"S": "2026-01-02T03:04:05.123456Z"},
    }
    assert success["State"] == {"S": "SUCCESS"} and success["TaskName"] == {"S": "add"}
    assert success["CreatedAt"] == pending["CreatedAt"]  # UpdateItem leaves it
    assert success["Results"] == {  # Go's %v text, which is all a Go reader gets
        "L": [
            {"M": {"Type": {"S": "int64"}, "Value": {"S": "5"}}},
            {"M": {"Type": {"S": "float64"}, "Value": {"S": "1.234567e+06"}}},
            {"M": {"Type": {"S": "[]string"}, "Value": {"S": "[a b c]"}}},
        ]
    }
    state = read["state"]
    assert [r.value for r in state.results] == [5, 1234567, ["a", "b c"]]  # exact, from MachineryResults
    assert state.task_name == "add" and state.created_at == created


def test_failure_and_groups_are_gos_items(backend: DynamoDBBackend) -> None:
    uuid, group = unique("task"), unique("group")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        await backend.write_states([TaskState(uuid, FAILURE, error="boom")], True)
        await backend.write_group_meta(GroupMeta(group, ["a", "b"], created_at=datetime.now(timezone.utc)))
        return (
            await raw_item(backend, STATES_TABLE, "TaskUUID", uuid),
            await raw_item(backend, GROUPS_TABLE, "GroupUUID", group),
        )

    failure, meta = run_sync(scenario())
    assert failure["State"] == {"S": "FAILURE"} and failure["Error"] == {"S": "boom"} and "N" in failure["TTL"]
    assert meta["TaskUUIDs"] == {"L": [{"S": "a"}, {"S": "b"}]}  # a list of S, not SS
    assert meta["ChordTriggered"] == {"BOOL": False} and meta["Lock"] == {"BOOL": False}
    assert set(meta) == {"GroupUUID", "TaskUUIDs", "ChordTriggered", "Lock", "CreatedAt", "TTL"}


def test_items_written_by_go_are_read(backend: DynamoDBBackend) -> None:
    uuid = unique("task")
    go_item = {  # what Go's setTaskState leaves: %v strings only, no MachineryResults
        "TaskUUID": s(uuid),
        "TaskName": s("types"),
        "State": s("SUCCESS"),
        "Results": {
            "L": [
                {"M": {"Type": s("int64"), "Value": s("5")}},
                {"M": {"Type": s("float64"), "Value": s("1.5")}},
                {"M": {"Type": s("bool"), "Value": s("true")}},
                {"M": {"Type": s("string"), "Value": s("héllo")}},
                {"M": {"Type": s("[]int64"), "Value": s("[1 2 3]")}},
                {"M": {"Type": s("[]uint8"), "Value": s("[104 105]")}},
            ]
        },
        "Error": s(""),
        "CreatedAt": s("2026-01-02T03:04:05.123456789Z"),
        "TTL": {"N": "0"},
    }

    async def scenario() -> TaskState | None:
        async with await backend._db("writing Go's item") as db:
            await db.put_item(TableName=STATES_TABLE, Item=go_item)
        return await backend.get_state(uuid)

    state = run_sync(scenario())
    assert state is not None and state.is_success()
    assert decode_results(state.results) == (5, 1.5, True, "héllo", [1, 2, 3], b"hi")


@pytest.mark.parametrize(
    ("go_type", "value", "text"),
    [  # checked with Go's fmt.Sprintf("%v") (docs/wire.md §11.5)
        ("int64", 5, "5"),
        ("float64", 3, "3"),
        ("float64", 1.5, "1.5"),
        ("float64", 123456, "123456"),
        ("float64", 1234567, "1.234567e+06"),
        ("float64", 0.00001, "1e-05"),
        ("string", "abc", "abc"),
        ("bool", True, "true"),
        ("[]int64", [1, 2, 3], "[1 2 3]"),
        ("[]string", ["a", "b c"], "[a b c]"),
        ("[]uint8", "aGk=", "[104 105]"),
        ("uint64", 18446744073709551615, "18446744073709551615"),
        ("int64", None, "<nil>"),
    ],
)
def test_go_value_text(go_type: str, value: Any, text: str) -> None:
    assert go_text(go_type, value) == text
    if go_type != "[]string" and value is not None:
        assert from_go_text(go_type, text) == value


def test_chord_trigger_is_exactly_once(backend: DynamoDBBackend) -> None:
    group = unique("group")

    async def race() -> list[bool]:
        await backend.write_group_meta(GroupMeta(group, ["a"], created_at=datetime.now(timezone.utc)))
        return list(await asyncio.gather(*(backend.trigger_chord(group, 1) for _ in range(20))))

    assert sorted(run_sync(race())) == [False] * 19 + [True]
    assert run_sync(backend.trigger_chord(unique("no_such_group"), 1)) is False


def test_states_of_a_group_come_in_group_order(backend: DynamoDBBackend) -> None:
    uuids = [unique("m") for _ in range(130)]  # more than one BatchGetItem

    async def scenario() -> list[TaskState | None]:
        await backend.write_states(
            [TaskState(u, SUCCESS, results=[TaskResult("int64", i)]) for i, u in enumerate(uuids)], True
        )
        return await backend.get_states([*uuids, "missing"])

    states = run_sync(scenario())
    assert [st.task_uuid for st in states[:-1] if st] == uuids and states[-1] is None


def test_missing_tables_are_named(harness: DynamoDBHarness) -> None:
    config = make_config(harness, task_states_table=unique("absent"), create_tables=False)
    backend = DynamoDBBackend(config, harness.url("q"))
    with pytest.raises(ConfigError, match="does not exist: create it with hash key TaskUUID"):
        run_sync(backend.get_state("x"))


def test_create_tables_enables_ttl(harness: DynamoDBHarness) -> None:
    states, groups = unique("states"), unique("groups")
    backend = DynamoDBBackend(
        make_config(harness, task_states_table=states, group_metas_table=groups), harness.url("q")
    )

    async def scenario() -> dict[str, Any]:
        await backend.get_state("x")
        async with backend.clients.call("describing") as db:
            ttl: dict[str, Any] = await db.describe_time_to_live(TableName=states)
            await db.delete_table(TableName=states)
            await db.delete_table(TableName=groups)
        return ttl

    ttl = run_sync(scenario())
    assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED", "AttributeName": "TTL"}


def test_annotations_revocations_and_workers(backend: DynamoDBBackend) -> None:
    uuid = unique("task")

    async def scenario() -> None:
        assert await backend.get_annotation(uuid, "traceback") is None
        await backend.write_states([TaskState(uuid, PENDING, "add")], False)
        await backend.write_annotation(uuid, "traceback", "Traceback ...")
        assert await backend.get_annotation(uuid, "traceback") == "Traceback ..."
        state = await backend.get_state(uuid)
        assert state is not None and state.state == PENDING  # beside the state, not in it

        version, _revoked = await backend.revocations(-1) or (0, {})
        await backend.revoke(uuid, terminate=True)
        found = await backend.revocations(version)
        assert found is not None and found[1][uuid] is True
        assert await backend.revocations(found[0]) is None  # nothing new

        now = datetime.now(timezone.utc)
        info = WorkerInfo(unique("w"), "host", 1, "q", 2, ["add"], started_at=now, seen_at=now)
        await backend.write_worker(info, ttl=30)
        assert info.tag in [w.tag for w in await backend.get_workers()]
        await backend.forget_worker(info.tag)
        assert info.tag not in [w.tag for w in await backend.get_workers()]

    run_sync(scenario())


def test_lock(harness: DynamoDBHarness) -> None:
    lock = DynamoDBLock(make_config(harness), harness.url("q"))
    key = unique("lock")

    async def scenario() -> None:
        deadline = time.time_ns() + 60 * 10**9
        results = await asyncio.gather(*(lock.try_lock(key, deadline) for _ in range(10)))
        assert sorted(results) == [False] * 9 + [True]
        assert await lock.try_lock(unique("lock"), time.time_ns() - 1)  # a fresh key
        assert await lock.claim(key + "c", "first", 60) is None
        assert await lock.claim(key + "c", "second", 60) == "first"
        assert await lock.release(key + "c", "second") is False
        assert await lock.release(key + "c", "first") is True
        assert await lock.claim(key + "c", "second", 60) is None
        waits = [await lock.take_turn(key + "r", 10.0, 1) for _ in range(3)]
        assert waits[0] == 0.0 and 9 < waits[1] <= 10 and 19 < waits[2] <= 20
        await lock.close()

    run_sync(scenario())


def test_server_uses_dynamodb_for_results_and_locks(harness: DynamoDBHarness) -> None:
    server = Server(make_config(harness))
    assert isinstance(server.backend, DynamoDBBackend) and isinstance(server.lock, DynamoDBLock)
    server.close()
