"""The embedded SQLite broker, result backend and lock: at-least-once delivery on the default
that needs nothing installed.

Store-level tests drive the broker, backend and lock directly; end-to-end tests run workers
in threads and in subprocesses sharing one database file, including a worker SIGKILLed in the
middle of a task. Nothing here asserts how long anything took: every wait is bounded only so
that a broken implementation fails instead of hanging, and those bounds are generous.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from machinery import (
    PENDING,
    STARTED,
    SUCCESS,
    Config,
    ConfigError,
    Server,
    Signature,
    TaskState,
)
from machinery._drivers.sqlite import MEMORY, parse_sqlite_url
from machinery.backends.sqlite import SQLiteBackend
from machinery.brokers.sqlite import SQLiteBroker
from machinery.locks.sqlite import SQLiteLock
from support.configs import config_for
from support.workers import running_worker

WAIT = 30.0  # upper bound for anything to happen; never an expectation of speed


@pytest.fixture
def config(tmp_path: Path, queue_name: str) -> Config:
    # A 1 s lease: a dead consumer's messages come back quickly.
    return config_for("sqlite", tmp_path, queue_name, heartbeat_timeout=1.0)


@pytest.fixture
def server(config: Config) -> Iterator[Server]:
    server = Server(config)

    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    yield server
    server.close()


def broker_of(server: Server) -> SQLiteBroker:
    assert isinstance(server.broker, SQLiteBroker)
    return server.broker


def backend_of(server: Server) -> SQLiteBackend:
    assert isinstance(server.backend, SQLiteBackend)
    return server.backend


def db_path(config: Config) -> str:
    return parse_sqlite_url(config.broker)[0]


def count_rows(config: Config, table: str) -> int:
    with sqlite3.connect(db_path(config)) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def signature(name: str = "add", *args: object, **options: object) -> Signature:
    sig = Signature(name, list(args or (1, 2)), **options)  # type: ignore[arg-type]
    if not sig.uuid:
        sig.uuid = f"task_{os.urandom(8).hex()}"
    return sig


# ---------------------------------------------------------------------------------- URLs and files


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_sqlite_url("sqlite:///machinery.db") == (str(tmp_path / "machinery.db"), "full")
    assert parse_sqlite_url("sqlite:///sub/dir/x.db") == (str(tmp_path / "sub/dir/x.db"), "full")
    assert parse_sqlite_url("sqlite:////abs/x.db") == ("/abs/x.db", "full")
    assert parse_sqlite_url("sqlite:////abs/x.db?synchronous=NORMAL") == ("/abs/x.db", "normal")
    assert parse_sqlite_url("sqlite://") == (MEMORY, "full")
    assert parse_sqlite_url("sqlite:///:memory:") == (MEMORY, "full")
    with pytest.raises(ConfigError, match="host"):
        parse_sqlite_url("sqlite://somehost/x.db")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_sqlite_url("sqlite:///x.db?mode=ro")


def test_default_config_makes_a_file_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(Config(default_queue="default_file_q"))
    try:
        assert not (tmp_path / "machinery.db").exists()  # nothing is opened before it is used
        server.send_task(signature())
        monkeypatch.chdir("/")  # the path was fixed when the server was made
        assert len(server.get_pending_tasks()) == 1
        assert (tmp_path / "machinery.db").exists()
        with sqlite3.connect(tmp_path / "machinery.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        server.close()


async def test_parent_directories_are_created_and_one_store_is_shared(tmp_path: Path) -> None:
    config = Config(broker=f"sqlite:///{tmp_path}/a/b/c.db", default_queue="q")
    server = Server(config)
    try:
        await server.asend_task(signature())
        assert (tmp_path / "a" / "b" / "c.db").exists()
        assert isinstance(server.lock, SQLiteLock)
        # Broker, backend and lock of one file share one connection thread in this process.
        assert broker_of(server).store is backend_of(server).store is server.lock._handle.store
        other = Server(config)
        assert broker_of(other).store is broker_of(server).store
        await other.aclose()
        assert len(await server.broker.get_pending_tasks()) == 1  # still open for the first server
    finally:
        await server.aclose()


async def test_memory_database_is_private_to_the_process(queue_name: str) -> None:
    server = Server(Config(broker="sqlite://", default_queue=queue_name))
    try:
        await server.asend_task(signature())
        consumer = await server.broker.open_consumer(queue_name, "t")
        assert len(await consumer.fetch(5, 1.0)) == 1
        await consumer.close()
    finally:
        await server.aclose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
async def test_a_forked_child_opens_its_own_connection(server: Server) -> None:
    await server.broker.publish(signature())  # the parent's store is open, with its threads
    pid = os.fork()
    if pid == 0:  # the child: the inherited store must not be used (its threads are not here)
        code = 1
        try:
            asyncio.run(server.broker.publish(signature("add", 5, 5)))
            code = 0
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(await server.broker.get_pending_tasks()) == 2


# ---------------------------------------------------------------------------------- broker


async def test_delayed_task_waits_for_its_eta(server: Server, config: Config) -> None:
    eta = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    later = signature("add", 1, 1, eta=eta)
    await server.broker.publish(later)
    consumer = await server.broker.open_consumer(config.default_queue, "t")
    assert await consumer.fetch(1, 0) == []
    assert [s.uuid for s in await server.broker.get_delayed_tasks()] == [later.uuid]
    assert await server.broker.get_pending_tasks() == []
    await server.broker.publish(signature("add", 2, 2))
    (ready,) = await consumer.fetch(5, 1.0)  # the ready one comes first, alone
    assert Signature.decode(ready.body).args == signature("add", 2, 2).args
    # One fetch that waits past the ETA gets it (it wakes by itself, nobody publishes).
    remaining = (eta - datetime.now(timezone.utc)).total_seconds()
    (due,) = await consumer.fetch(5, remaining + 5.0)
    assert datetime.now(timezone.utc) >= eta, "a delayed task was handed out before its ETA"
    assert Signature.decode(due.body).uuid == later.uuid
    assert await server.broker.get_delayed_tasks() == []
    await consumer.close()


async def test_a_renewed_lease_is_kept_and_close_gives_it_back(tmp_path: Path, queue_name: str) -> None:
    # A 2 s lease renewed every 2/3 s leaves a loaded machine plenty of slack.
    server = Server(config_for("sqlite", tmp_path, queue_name, heartbeat_timeout=2.0))
    try:
        await server.broker.publish(signature())
        holder = await server.broker.open_consumer(queue_name, "holder")
        (held,) = await holder.fetch(1, 1.0)
        other = await server.broker.open_consumer(queue_name, "other")
        assert await other.fetch(1, 5.0) == []  # more than two leases long
        await holder.close()  # closing gives it back at once
        (handed,) = await other.fetch(1, WAIT)
        assert handed.body == held.body
        await other.ack(handed)
        await other.close()
    finally:
        await server.aclose()


async def test_a_locked_database_is_waited_for_without_blocking_the_loop(server: Server, config: Config) -> None:
    await server.broker.get_pending_tasks()  # the file and schema exist
    blocker = sqlite3.connect(db_path(config), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    publish = asyncio.ensure_future(server.broker.publish(signature()))
    await asyncio.sleep(0.5)
    assert not publish.done()
    assert ticks > 0, "the event loop was blocked by a waiting sqlite3 call"
    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.wait_for(publish, WAIT)
    ticking.cancel()
    assert len(await server.broker.get_pending_tasks()) == 1


# ---------------------------------------------------------------------------------- backend


async def test_states_are_stored_as_the_redis_json_and_keep_created(server: Server, config: Config) -> None:
    backend = backend_of(server)
    sig = signature()
    await backend.set_pending([sig])
    pending = await backend.get_state(sig.uuid)
    assert pending is not None and pending.state == PENDING and pending.task_name == "add"
    await backend.set_state(sig, STARTED)
    started = await backend.get_state(sig.uuid)
    assert started is not None and started.state == STARTED and started.created_at == pending.created_at
    with sqlite3.connect(db_path(config)) as conn:
        (stored,) = conn.execute("SELECT body FROM task_states WHERE uuid = ?", (sig.uuid,)).fetchone()
    assert stored.encode() == started.encode()
    assert list(json.loads(stored)) == ["TaskUUID", "TaskName", "State", "Results", "Error", "CreatedAt", "TTL"]
    assert await backend.get_states([sig.uuid, "missing"]) == [started, None]
    await backend.purge_state(sig.uuid)
    assert await backend.get_state(sig.uuid) is None


async def test_results_expire(tmp_path: Path, queue_name: str) -> None:
    server = Server(config_for("sqlite", tmp_path, queue_name, results_expire_in=1))
    try:
        backend = backend_of(server)
        await backend.write_states([TaskState("gone", SUCCESS, "add")], False)
        await backend.init_group("group_gone", ["gone"])
        assert await backend.get_state("gone") is not None
        await asyncio.sleep(1.2)
        assert await backend.get_state("gone") is None
        assert await backend.get_group_meta("group_gone") is None
        backend._next_purge = 0.0  # the next write sweeps expired rows
        await backend.write_states([TaskState("fresh", PENDING, "add")], False)
        assert count_rows(server.config, "task_states") == 1
    finally:
        await server.aclose()


# ---------------------------------------------------------------------------------- end to end


def test_the_sync_face_works_beside_a_worker_thread(server: Server) -> None:
    with running_worker(server, concurrency=2):
        result = server.send_task(signature("add", 20, 22))
        assert result.get(timeout=WAIT) == 42
        state = result.state()
        assert state.state == SUCCESS and state.created_at is not None
