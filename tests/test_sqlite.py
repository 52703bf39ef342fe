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
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import config_for, running_worker, wait_until
from machinery import (
    FAILURE,
    PENDING,
    STARTED,
    SUCCESS,
    Config,
    ConfigError,
    GroupMeta,
    Server,
    Signature,
    TaskState,
)
from machinery._drivers.sqlite import MEMORY, parse_sqlite_url
from machinery._sync import run_sync
from machinery.backends.sqlite import SQLiteBackend
from machinery.brokers.sqlite import SQLiteBroker, SQLiteConsumer
from machinery.locks.sqlite import SQLiteLock

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


# ---------------------------------------------------------------------------------- subprocesses

SCRIPT = r'''
"""Worker, sender, consumer and racer processes for tests/test_sqlite.py."""
import asyncio, json, os, sys, time
from machinery import Config, RedisConfig, Server, SUCCESS, RECEIVED, TaskState
from machinery.types import TaskResult

url, queue, mode, *rest = sys.argv[1:]
config = Config(broker=url, default_queue=queue, heartbeat_timeout=1.0,
                redis=RedisConfig(normal_tasks_poll_period=200))
server = Server(config)

@server.task
def add(a: int, b: int) -> int:
    return a + b

@server.task
def slow(marker: str) -> str:
    # The first run leaves a mark and hangs (it is killed); any later run completes.
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    return "done"

def start_at(moment: str) -> None:
    time.sleep(max(0.0, float(moment) - time.time()))

async def consume(count_idle: float) -> None:
    consumer = await server.broker.open_consumer(queue, f"proc{os.getpid()}")
    taken = []
    while True:
        deliveries = await consumer.fetch(3, count_idle)
        if not deliveries:
            break
        for d in deliveries:
            taken.append(d.body.decode())
            await consumer.ack(d)
    await consumer.close()
    print(json.dumps(taken), flush=True)

async def race(group: str, key: str, moment: str) -> None:
    start_at(moment)
    chord = await server.backend.trigger_chord(group, 1)
    locked = await server.lock.try_lock(key, time.time_ns() + 60 * 10**9)
    print(json.dumps({"chord": chord, "lock": locked}), flush=True)

async def complete(task_uuid: str) -> None:
    await server.backend.write_states([TaskState(task_uuid, RECEIVED, "add")], True)
    await asyncio.sleep(0.2)
    await server.backend.write_states([TaskState(task_uuid, SUCCESS, "add", [TaskResult("int64", 3)])], True)

if mode == "worker":
    server.new_worker(concurrency=int(rest[0])).launch()
elif mode == "send":
    base, count = int(rest[0]), int(rest[1])
    for i in range(count):
        result = add.send(base, i)
        print(json.dumps([result.task_uuid, base + i]), flush=True)
elif mode == "consume":
    asyncio.run(consume(float(rest[0])))
elif mode == "race":
    asyncio.run(race(*rest))
elif mode == "complete":
    asyncio.run(complete(rest[0]))
server.close()
'''


class Processes:
    """Starts helper processes on the test's database and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path, config: Config) -> None:
        self.script = tmp_path / "sqlite_helper.py"
        self.script.write_text(SCRIPT)
        self.tmp_path = tmp_path
        self.config = config
        self.started: list[subprocess.Popen[str]] = []

    def start(self, mode: str, *args: object, capture: bool = False) -> subprocess.Popen[str]:
        log = open(self.tmp_path / f"{mode}-{len(self.started)}.log", "w")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(
            [sys.executable, str(self.script), self.config.broker, self.config.default_queue, mode, *map(str, args)],
            stdout=subprocess.PIPE if capture else log,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.started.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[str]) -> str:
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, f"helper failed ({proc.returncode}): {self.logs()}"
        return out

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Ask a worker process to finish (SIGTERM drains) and wait for it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(WAIT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp_path.glob("*.log")))

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(WAIT)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def procs(tmp_path: Path, config: Config) -> Iterator[Processes]:
    processes = Processes(tmp_path, config)
    try:
        yield processes
    finally:
        processes.cleanup()


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


async def test_publish_fetch_ack_in_fifo_order(server: Server, config: Config) -> None:
    sigs = [signature("add", i, 0) for i in range(5)]
    for sig in sigs:
        await server.broker.publish(sig)
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [s.uuid for s in sigs]
    consumer = await server.broker.open_consumer(config.default_queue, "t")
    first = await consumer.fetch(2, 1.0)
    assert [Signature.decode(d.body).uuid for d in first] == [sigs[0].uuid, sigs[1].uuid]
    # Taken messages are no longer pending, and are never handed out twice.
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [s.uuid for s in sigs[2:]]
    rest = await consumer.fetch(10, 1.0)
    assert [Signature.decode(d.body).uuid for d in rest] == [s.uuid for s in sigs[2:]]
    for delivery in first + rest:
        await consumer.ack(delivery)
    assert await consumer.fetch(10, 0) == []
    await consumer.close()
    assert count_rows(config, "messages") == 0


async def test_requeue_goes_to_the_back_and_close_returns_to_the_head(server: Server, config: Config) -> None:
    sigs = [signature("add", i, 0) for i in range(3)]
    await server.broker.publish_many(sigs)
    consumer = await server.broker.open_consumer(config.default_queue, "t")
    (first,) = await consumer.fetch(1, 1.0)
    await consumer.requeue(first)
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [sigs[1].uuid, sigs[2].uuid, sigs[0].uuid]
    (second,) = await consumer.fetch(1, 1.0)
    assert Signature.decode(second.body).uuid == sigs[1].uuid
    await consumer.close()  # never finished: back where it was, at the head
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [sigs[1].uuid, sigs[2].uuid, sigs[0].uuid]


async def test_dead_letter_and_requeue_dead(server: Server, config: Config) -> None:
    broker = broker_of(server)
    await broker._push([(config.default_queue, b"\xffnot a task")])
    consumer = await broker.open_consumer(config.default_queue, "t")
    (delivery,) = await consumer.fetch(1, 1.0)
    await consumer.dead_letter(delivery, "cannot decode")
    assert await consumer.fetch(1, 0) == []
    (letter,) = await broker.dead_letters()
    assert (letter.queue, letter.reason, letter.body) == (config.default_queue, "cannot decode", b"\xffnot a task")
    assert abs(letter.time - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert await broker.dead_letters("another_queue") == []
    assert await broker.requeue_dead() == 1
    assert await broker.dead_letters() == []
    (again,) = await consumer.fetch(1, 1.0)
    assert again.body == b"\xffnot a task"
    await consumer.ack(again)
    await consumer.close()


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


async def test_two_consumers_never_share_a_message(server: Server, config: Config) -> None:
    sigs = [signature("add", i, 0) for i in range(200)]
    await server.broker.publish_many(sigs)
    got: list[list[str]] = [[], []]

    async def drain(index: int) -> None:
        consumer = await server.broker.open_consumer(config.default_queue, f"c{index}")
        while deliveries := await consumer.fetch(1 + index * 4, 0.3):
            for delivery in deliveries:
                got[index].append(Signature.decode(delivery.body).uuid)
                await consumer.ack(delivery)
        await consumer.close()

    await asyncio.gather(drain(0), drain(1))
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(s.uuid for s in sigs)


async def test_consumers_in_several_processes_never_share_a_message(
    server: Server, config: Config, procs: Processes
) -> None:
    sigs = [signature("add", i, 0) for i in range(300)]
    await server.broker.publish_many(sigs)
    consumers = [procs.start("consume", 1.0, capture=True) for _ in range(3)]
    outputs = [await asyncio.to_thread(procs.output, proc) for proc in consumers]
    taken = [[Signature.decode(body).uuid for body in json.loads(out)] for out in outputs]
    flat = [u for part in taken for u in part]
    assert len(flat) == len(set(flat)), "a message was delivered to two consumers"
    assert sorted(flat) == sorted(s.uuid for s in sigs)


async def test_an_expired_lease_is_taken_over(server: Server, config: Config) -> None:
    first_sig = signature("add", 1, 0)
    await server.broker.publish(first_sig)
    dead = await server.broker.open_consumer(config.default_queue, "dead")
    assert isinstance(dead, SQLiteConsumer)
    (taken,) = await dead.fetch(1, 1.0)
    dead._renewer.cancel()  # this consumer goes silent, as a SIGKILLed worker would
    alive = await server.broker.open_consumer(config.default_queue, "alive")
    (retaken,) = await alive.fetch(1, WAIT)  # the lease (1 s) runs out and the message is free again
    assert Signature.decode(retaken.body).uuid == first_sig.uuid
    await dead.ack(taken)  # too late: no longer this consumer's, nothing happens
    assert count_rows(config, "messages") == 1
    await alive.ack(retaken)
    assert count_rows(config, "messages") == 0

    await alive.close()
    await dead.close()


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


async def test_a_cancelled_fetch_leaves_nothing_taken(server: Server, config: Config) -> None:
    consumer = await server.broker.open_consumer(config.default_queue, "t")
    for _ in range(20):
        await server.broker.publish(signature())
        fetch = asyncio.ensure_future(consumer.fetch(1, 1.0))
        await asyncio.sleep(0)
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        if not fetch.cancelled():
            (delivery,) = fetch.result()
            await consumer.ack(delivery)
    other = await server.broker.open_consumer(config.default_queue, "other")
    while deliveries := await other.fetch(10, 0.5):  # whatever the cancelled fetches took was handed back
        for delivery in deliveries:
            await other.ack(delivery)
    assert count_rows(config, "messages") == 0
    await other.close()
    await consumer.close()


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


async def test_group_meta_and_chord_trigger_once(server: Server) -> None:
    backend = backend_of(server)
    await backend.init_group("group_1", ["a", "b"])
    meta = await backend.get_group_meta("group_1")
    assert isinstance(meta, GroupMeta) and meta.task_uuids == ["a", "b"] and not meta.chord_triggered
    await backend.write_states([TaskState("a", SUCCESS), TaskState("b", FAILURE, error="x")], False)
    assert await backend.group_completed("group_1", 2)
    results = await asyncio.gather(*(backend.trigger_chord("group_1", 1) for _ in range(10)))
    assert results.count(True) == 1
    meta = await backend.get_group_meta("group_1")
    assert meta is not None and meta.chord_triggered
    assert await backend.trigger_chord("no_such_group", 1) is False
    await backend.purge_group_meta("group_1")
    assert await backend.get_group_meta("group_1") is None


async def test_lock_semantics(server: Server) -> None:
    lock = server.lock
    later = time.time_ns() + 60 * 10**9
    assert await lock.try_lock("k", later)
    assert not await lock.try_lock("k", later)
    assert not await lock.lock("k", later, retries=3)
    assert await lock.try_lock("expired", time.time_ns() - 1)
    assert await lock.try_lock("expired", later)  # its stored deadline had passed


async def test_chord_trigger_and_lock_are_atomic_across_processes(server: Server, procs: Processes) -> None:
    await backend_of(server).init_group("group_race", ["a"])
    start = time.time() + 2.0  # every process is up by then and they all go at once
    racers = [procs.start("race", "group_race", "lock_race", start, capture=True) for _ in range(4)]
    outcomes = [json.loads(await asyncio.to_thread(procs.output, proc)) for proc in racers]
    assert [o["chord"] for o in outcomes].count(True) == 1, outcomes
    assert [o["lock"] for o in outcomes].count(True) == 1, outcomes


async def test_await_state_wakes_on_a_write_by_another_process(server: Server, procs: Processes) -> None:
    backend = backend_of(server)
    backend.poll_interval = 3600.0  # only a notification can wake it
    waiting = asyncio.ensure_future(backend.await_state("task_from_afar", WAIT))
    await asyncio.sleep(0.1)
    writer = procs.start("complete", "task_from_afar")
    state = await waiting
    assert state.state == SUCCESS and state.results is not None and state.results[0].value == 3
    await asyncio.to_thread(writer.wait, WAIT)


async def test_await_state_wakes_on_a_local_write(server: Server) -> None:
    backend = backend_of(server)
    backend.poll_interval = 3600.0
    waiting = asyncio.ensure_future(backend.await_state("local", WAIT))
    await asyncio.sleep(0.05)
    await backend.write_states([TaskState("local", SUCCESS, "add")], True)
    assert (await waiting).state == SUCCESS


# ---------------------------------------------------------------------------------- end to end


def test_worker_runs_tasks_and_dead_letters_garbage(server: Server, config: Config) -> None:
    with running_worker(server, concurrency=4):
        results = [server.send_task(signature("add", i, i)) for i in range(10)]
        assert [r.get(timeout=WAIT) for r in results] == [2 * i for i in range(10)]
        run_sync(broker_of(server)._push([(config.default_queue, b"{garbage")]))
        wait_until(lambda: server.dead_letters(), timeout=WAIT, what="dead-lettering")
    (letter,) = server.dead_letters()
    assert letter.body == b"{garbage" and letter.reason
    assert count_rows(config, "messages") == 0


def test_a_task_of_a_sigkilled_worker_completes_on_another(
    server: Server, config: Config, procs: Processes, tmp_path: Path
) -> None:
    marker = tmp_path / "slow.started"

    @server.task
    def slow(marker: str) -> str:  # the same task as the helper's: hangs on its first run only
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(120)
        return "done"

    worker = procs.start("worker", 1)
    result = server.send_task(slow.signature(str(marker)))
    # STARTED is written just before the function runs; the marker says it is running.
    wait_until(lambda: marker.exists(), timeout=WAIT, what="the task starting")
    assert result.state().state == STARTED
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(WAIT)
    assert result.state().state == STARTED
    with running_worker(server, concurrency=1):
        assert result.get(timeout=WAIT) == "done"
    assert result.state().state == SUCCESS
    assert count_rows(config, "messages") == 0


def test_several_processes_send_and_work_on_one_file(server: Server, config: Config, procs: Processes) -> None:
    workers = [procs.start("worker", 4) for _ in range(2)]
    senders = [procs.start("send", base, 40, capture=True) for base in (1000, 2000)]
    sent = [json.loads(line) for proc in senders for line in procs.output(proc).splitlines()]
    assert len(sent) == 80
    for task_uuid, expected in sent:
        assert server.result(task_uuid).get(timeout=WAIT) == expected
    for proc in workers:
        procs.stop(proc)
        assert proc.returncode == 0, procs.logs()
    assert server.get_pending_tasks() == []
    assert count_rows(config, "messages") == 0


def test_the_sync_face_works_beside_a_worker_thread(server: Server) -> None:
    with running_worker(server, concurrency=2):
        result = server.send_task(signature("add", 20, 22))
        assert result.get(timeout=WAIT) == 42
        state = result.state()
        assert state.state == SUCCESS and state.created_at is not None
