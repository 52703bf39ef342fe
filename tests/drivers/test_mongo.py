"""The MongoDB backend against a real server: ``MACHINERY_TEST_MONGO_URL`` (for example
``mongodb://127.0.0.1:27017``). MongoDB cannot be installed on this project's machines (Debian
does not package it), so without that variable the server tests skip with the reason, under CI
too: the one driver where that is allowed. One test needs no server: an unreachable one. The
documents themselves are pinned against Go's shapes in tests/unit/test_mongo_documents.py."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from machinery import Chord, Config, Group, MongoDBConfig, Server, Signature
from machinery._sync import run_sync
from machinery.backends.mongo import GROUP_METAS, TASKS, MongoBackend
from machinery.state import PENDING, STARTED, SUCCESS, TaskState
from machinery.types import TaskResult
from support.fixtures import unique
from support.services import REDIS_URL, require_service
from support.workers import running_worker

MONGO_URL = os.environ.get("MACHINERY_TEST_MONGO_URL", "")

needs_mongo = pytest.mark.skipif(
    not MONGO_URL,
    reason="MACHINERY_TEST_MONGO_URL is not set: no MongoDB server to test against (none can be installed here)",
)


@pytest.fixture
def backend() -> MongoBackend:
    database = unique("machinery_test")
    config = Config(broker="memory://", result_backend=MONGO_URL, mongodb=MongoDBConfig(database=database))
    return MongoBackend(config, MONGO_URL)


def run(backend: MongoBackend, scenario: Any) -> Any:
    async def wrapped() -> Any:
        try:
            return await scenario()
        finally:
            await backend._loops.get().client.drop_database(backend._database)
            await backend.close()

    return run_sync(wrapped())


@needs_mongo
def test_states_accumulate_in_gos_document_with_the_ttl_index(backend: MongoBackend) -> None:
    uuid = unique("task")

    async def scenario() -> tuple[Any, Any, Any]:
        await backend.set_pending([Signature("add", [], uuid=uuid)])
        await backend.write_states([TaskState(uuid, STARTED, "add")], True)
        await backend.write_states([TaskState(uuid, SUCCESS, "add", [TaskResult("int64", 3)])], True)
        client = backend._loops.get().client[backend._database]
        document = await client[TASKS].find_one({"_id": uuid})
        indexes = await client[TASKS].index_information()
        return document, indexes, await backend.get_state(uuid)

    document, indexes, state = run(backend, scenario)
    assert set(document) == {"_id", "state", "task_name", "created_at", "results", "delete_at"}
    assert document["state"] == SUCCESS and document["results"] == [{"type": "int64", "value": 3}]
    assert indexes["delete_at_1"]["expireAfterSeconds"] == 0
    assert state.state == SUCCESS and state.results == [TaskResult("int64", 3)] and state.task_name == "add"


@needs_mongo
def test_the_chord_is_won_by_the_matched_update_only(backend: MongoBackend) -> None:
    group = unique("group")

    async def scenario() -> list[bool]:
        await backend.init_group(group, ["a", "b"])
        await backend.init_group(group, ["a", "b"])  # an at-least-once resend is no error
        return list(await asyncio.gather(*(backend.trigger_chord(group, 2) for _ in range(20))))

    assert run(backend, scenario).count(True) == 1


@needs_mongo
def test_a_go_written_document_is_read(backend: MongoBackend) -> None:
    async def scenario() -> Any:
        client = backend._loops.get().client[backend._database]
        await client[TASKS].insert_one(
            {"_id": "task_go", "state": "SUCCESS", "results": [{"type": "json", "value": {"a": 1.0}}]}
        )
        await client[GROUP_METAS].insert_one(
            {"_id": "group_go", "task_uuids": ["task_go"], "chord_triggered": False, "lock": False}
        )
        return await backend.get_state("task_go"), await backend.group_task_states("group_go")

    state, members = run(backend, scenario)
    assert state.results == [TaskResult("string", '{"a":1}')]
    assert [m.task_uuid for m in members] == ["task_go"]


@needs_mongo
def test_pending_without_a_server_state_is_none(backend: MongoBackend) -> None:
    async def scenario() -> Any:
        await backend.write_states([TaskState("task_p", PENDING, "f")], False)
        return await backend.get_state("task_p"), await backend.get_state("task_absent")

    pending, absent = run(backend, scenario)
    assert pending.state == PENDING and absent is None


@needs_mongo
@pytest.mark.redis
def test_a_redis_broker_with_a_mongo_backend() -> None:
    require_service("Redis", REDIS_URL, 6379)
    queue = unique("mongo_q")
    database = unique("machinery_test")
    server = Server(
        Config(
            broker=REDIS_URL,
            result_backend=MONGO_URL,
            default_queue=queue,
            mongodb=MongoDBConfig(database=database),
        )
    )

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @server.task("total")
    def total(*values: int) -> int:
        return sum(values)

    try:
        with running_worker(server, concurrency=4):
            assert server.send_task(Signature("add", [1, 2])).get(timeout=30) == 3
            chord = Chord(Group(*(Signature("add", [i, i]) for i in range(4))), Signature("total"))
            assert server.send_chord(chord).get(timeout=30) == 12
    finally:
        server.close()


def test_an_unreachable_server_is_a_connection_error_waiting_rides_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every operation goes through PyMongo's asyncio client to server selection; with nothing
    listening (loopback port 1) each fails with an error in ``connection_errors``, which
    ``await_state`` and the worker's retries treat as an outage, not a bug."""
    from machinery.backends import mongo

    monkeypatch.setattr(mongo, "CONNECT_TIMEOUT_MS", 200)
    url = "mongodb://127.0.0.1:1"
    backend = MongoBackend(Config(broker="memory://", result_backend=url), url)
    operations = [
        lambda: backend.get_state("t"),
        lambda: backend.get_states(["t", "u"]),
        lambda: backend.write_states([TaskState("t", PENDING, "f")], False),
        lambda: backend.init_group("g", ["t"]),
        lambda: backend.trigger_chord("g", 1),
        lambda: backend.purge_state("t"),
    ]

    async def scenario() -> list[str]:
        failures = []
        try:
            for operation in operations:
                with pytest.raises(backend.connection_errors) as caught:
                    await operation()
                failures.append(type(caught.value).__name__)
        finally:
            await backend.close()
        return failures

    assert run_sync(scenario()) == ["ServerSelectionTimeoutError"] * len(operations)
