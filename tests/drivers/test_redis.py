"""Redis-specific behaviour: Go's keys and JSON, at-least-once delivery, recovery.

The generic scenarios run over every broker in test_integration.py; these tests look at
what only Redis has: the Go-compatible key layout, processing lists and heartbeats, the
delayed-task mover, completion notifications, Go's chord mutex, and surviving a dead
worker or a restarted Redis server.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from machinery import SUCCESS, Config, RedisConfig, Server, Signature, TaskFailed
from machinery._sync import run_sync
from machinery.backends.redis import CHORD_MUTEX, DONE_CHANNEL
from machinery.brokers.redis import (
    _MOVE_DUE,
    RELEASED_HEARTBEAT_GRACE,
    RedisBroker,
    heartbeats_key,
    processing_prefix,
)
from machinery.locks.base import now_ns
from machinery.state import GroupMeta
from support.configs import config_for
from support.fixtures import unique
from support.interop import INTEROP_DIR
from support.recording import register_workflow_tasks
from support.servers import PrivateRedis
from support.services import REDIS_URL
from support.waiting import WAIT, wait_until
from support.workers import running_worker

pytestmark = pytest.mark.redis


@pytest.fixture
def config(redis_url: str, queue_name: str) -> Config:
    return Config(
        broker=redis_url,
        default_queue=queue_name,
        heartbeat_timeout=1.0,
        redis=RedisConfig(delayed_tasks_key=f"{queue_name}_delayed", normal_tasks_poll_period=200),
    )


@pytest.fixture
def server(config: Config) -> Iterator[Server]:
    server = Server(config)

    @server.task("add")
    def add(*args: int) -> int:
        return sum(args)

    yield server


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def taken_count(client: redis.Redis, queue: str) -> int:
    """Messages held in the processing lists of this queue's live consumers."""
    consumers = client.zrange(heartbeats_key(queue), 0, -1)
    return sum(client.llen(processing_prefix(queue) + consumer.decode()) for consumer in consumers)


def leftover_processing_lists(client: redis.Redis, queue: str) -> list[bytes]:
    """Processing lists of this queue that still exist, live consumer or not."""
    return list(client.scan_iter(match=processing_prefix(queue) + "*", count=50_000))


# ---------------------------------------------------------------------------- wire layout


def test_sent_task_is_gos_list_element_and_pending_state(server: Server, client: redis.Redis, queue_name: str) -> None:
    result = server.send_task(Signature("add", [1, 2]))
    [raw] = client.lrange(queue_name, 0, -1)
    message = json.loads(raw)
    assert list(message)[:4] == ["UUID", "Name", "RoutingKey", "ETA"] and len(message) == 19
    assert message["UUID"] == result.task_uuid and message["RoutingKey"] == queue_name
    assert message["Args"] == [{"Name": "", "Type": "int64", "Value": 1}, {"Name": "", "Type": "int64", "Value": 2}]
    state = json.loads(client.get(result.task_uuid))
    assert list(state) == ["TaskUUID", "TaskName", "State", "Results", "Error", "CreatedAt", "TTL"]
    assert state["State"] == "PENDING" and state["TaskName"] == "add"
    assert 3590 < client.ttl(result.task_uuid) <= 3600


def test_delayed_task_is_a_zset_member_scored_in_unix_ns(server: Server, client: redis.Redis) -> None:
    from datetime import datetime, timedelta, timezone

    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    server.send_task(Signature("add", [1], eta=eta))
    [(member, score)] = client.zrange(server.config.redis.delayed_tasks_key, 0, -1, withscores=True)
    assert abs(score - eta.timestamp() * 1e9) < 1e3
    assert json.loads(member)["ETA"].endswith("Z")
    assert [s.name for s in server.get_delayed_tasks()] == ["add"]


def test_worker_keeps_created_at_written_by_a_go_sender(server: Server, client: redis.Redis, queue_name: str) -> None:
    go_pending = json.loads((INTEROP_DIR / "backend_state_pending.json").read_text())
    go_message = json.loads((INTEROP_DIR / "redis_task_add.json").read_text())
    uuid = go_message["UUID"] + "-" + queue_name
    go_pending["TaskUUID"] = go_message["UUID"] = uuid
    go_message["RoutingKey"] = queue_name
    client.set(uuid, json.dumps(go_pending), ex=60)
    client.rpush(queue_name, json.dumps(go_message))
    with running_worker(server, concurrency=2):
        assert server.result(uuid).get(timeout=10) == 2
    stored = json.loads(client.get(uuid))
    # Go's nanosecond CreatedAt survives byte for byte (Go's backend does GET then SET to keep it).
    assert stored["CreatedAt"] == go_pending["CreatedAt"]
    assert stored["State"] == "SUCCESS" and stored["Results"] == [{"Type": "int64", "Value": 2}]


@pytest.mark.skipif(not INTEROP_DIR.exists(), reason="tests/interop/captures captures not present")
def test_go_messages_pushed_raw_complete_with_gos_results(config: Config, client: redis.Redis, queue_name: str) -> None:
    server = Server(config)

    @server.task("types")
    def types(b: bool, i: int, u: int, f: float, s: str, data: bytes) -> tuple[bool, int, int, float, str, bytes]:
        return b, i, u, f, s, data

    @server.task("sum_ints")
    def sum_ints(values: list[int]) -> int:
        return sum(values)

    @server.task("sum_floats")
    def sum_floats(values: list[float]) -> float:
        return sum(values)

    @server.task("split")
    def split(text: str) -> list[str]:
        return list(text)

    @server.task("multi")
    def multi(a: int, b: int) -> tuple[int, str]:
        return a + b, f"{a}-{b}"

    messages = [json.loads((INTEROP_DIR / "redis_types_task.json").read_text())]
    messages += [json.loads(line) for line in (INTEROP_DIR / "redis_slices_tasks.jsonl").read_text().splitlines()]
    go_states = {
        json.loads(line)["TaskUUID"]: json.loads(line)
        for line in (INTEROP_DIR / "backend_state_success_slices.jsonl").read_text().splitlines()
    }
    go_states[messages[0]["UUID"]] = json.loads((INTEROP_DIR / "backend_state_success_types.json").read_text())
    wanted = {}
    for message in messages:
        if message["UUID"] not in go_states or message["Name"] not in server.tasks:
            continue
        original = message["UUID"]
        message["UUID"] = f"{original}-{queue_name}"
        message["RoutingKey"] = queue_name
        wanted[message["UUID"]] = go_states[original]
        client.rpush(queue_name, json.dumps(message, ensure_ascii=False))
    assert len(wanted) >= 4
    with running_worker(server, concurrency=4):
        for uuid in wanted:
            server.result(uuid).get(timeout=10)
    for uuid, go_state in wanted.items():
        ours = json.loads(client.get(uuid))
        go_results = go_state["Results"]
        if go_state["TaskName"] == "types":  # Go's parameter was a plain int; ours is typed int64
            go_results = [dict(r, Type="int64") if r["Type"] == "int" else r for r in go_results]
        assert ours["Results"] == go_results, go_state["TaskName"]


# ---------------------------------------------------------------------------- delivery


def test_a_worker_never_takes_more_than_it_can_run(server: Server, client: redis.Redis, queue_name: str) -> None:
    running = 0
    most_running = 0

    @server.task("slow")
    async def slow() -> None:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await asyncio.sleep(0.3)
        running -= 1

    results = [server.send_task(Signature("slow")) for _ in range(4)]
    samples = []
    with running_worker(server, concurrency=1):
        while not all(r.state().is_completed() for r in results):
            samples.append((taken_count(client, queue_name), client.llen(queue_name)))
            time.sleep(0.01)
    assert most_running == 1
    # Go's broker pops several at concurrency 1. Ours takes the next message only when it can
    # start it: at most one more than the one running, while that one's outcome is written.
    assert max(taken for taken, _ in samples) <= 2
    assert any(queued >= 2 for _, queued in samples)
    assert leftover_processing_lists(client, queue_name) == []


def test_graceful_stop_returns_nothing_taken(server: Server, client: redis.Redis, queue_name: str) -> None:
    with running_worker(server, concurrency=3):
        results = [server.send_task(Signature("add", [i])) for i in range(20)]
        assert [r.get(timeout=10) for r in results] == list(range(20))
    assert leftover_processing_lists(client, queue_name) == []
    # The released consumer's heartbeat is left to lapse within the grace period, not renewed.
    [(_, deadline_ms)] = client.zrange(heartbeats_key(queue_name), 0, -1, withscores=True)
    assert deadline_ms <= (time.time() + RELEASED_HEARTBEAT_GRACE) * 1000


def test_a_message_landing_after_close_is_reaped(server: Server, client: redis.Redis, queue_name: str) -> None:
    broker = server.broker
    assert isinstance(broker, RedisBroker)

    async def open_and_close() -> str:
        consumer = await broker.open_consumer(queue_name, "closing")
        await consumer.close()
        await broker.close()
        return consumer.processing  # type: ignore[attr-defined,no-any-return]

    processing = asyncio.run(open_and_close())
    # What a blocking take cancelled at shutdown can do: land a message after the release.
    late = server.dispatcher.prepare(Signature("add", [20, 22]))
    client.rpush(processing, late.encode())
    time.sleep(RELEASED_HEARTBEAT_GRACE + 0.1)
    with running_worker(server, concurrency=1):
        assert server.result(late.uuid).get(timeout=10) == 42
    assert leftover_processing_lists(client, queue_name) == []


def test_delayed_mover_moves_many_due_tasks_per_round_trip(
    server: Server, client: redis.Redis, queue_name: str
) -> None:
    key = server.config.redis.delayed_tasks_key
    past = time.time_ns() - 1_000_000_000
    members = {Signature("add", [i], uuid=f"d{i}", routing_key=queue_name).encode(): past + i for i in range(300)}
    client.zadd(key, members)
    broker = server.broker
    assert isinstance(broker, RedisBroker)

    async def one_round() -> list[object]:
        result: list[object] = await broker.connector.run(_MOVE_DUE, [key], [time.time_ns(), 500, queue_name])
        await broker.close()
        return result

    moved, next_score = asyncio.run(one_round())
    assert moved == 300 and next_score is None
    assert client.llen(queue_name) == 300 and client.zcard(key) == 0
    assert json.loads(client.lindex(queue_name, 0))["UUID"] == "d0"  # oldest ETA first


# ---------------------------------------------------------------------------- waiting and chords


def test_waiting_client_is_woken_by_the_completion_not_by_polling(server: Server) -> None:
    server.backend.poll_interval = 60.0  # a poll would not come in time for the 10 s timeout
    with running_worker(server, concurrency=1):
        assert server.send_task(Signature("add", [4, 5])).get(timeout=10) == 9


def test_completion_is_published_with_the_state(server: Server, client: redis.Redis) -> None:
    pubsub = client.pubsub()
    result_uuid = "task_published_" + server.config.default_queue
    pubsub.subscribe(DONE_CHANNEL + result_uuid)
    pubsub.get_message(timeout=1)
    with running_worker(server, concurrency=1):
        server.send_task(Signature("add", [1, 1], uuid=result_uuid)).get(timeout=10)
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None and json.loads(message["data"])["State"] == "SUCCESS"


def test_failed_state_wakes_the_waiter_with_the_error(server: Server) -> None:
    @server.task("boom")
    def boom() -> None:
        raise ValueError("exploded")

    with running_worker(server, concurrency=1), pytest.raises(TaskFailed, match="exploded"):
        server.send_task(Signature("boom")).get(timeout=10)


def test_trigger_chord_interlocks_through_gos_global_mutex(server: Server, client: redis.Redis) -> None:
    group = "group_" + server.config.default_queue
    client.set(group, GroupMeta(group, ["a", "b"]).encode(), ex=60)
    client.set(CHORD_MUTEX, "held-by-a-go-worker", px=5000)

    async def scenario() -> tuple[bool, bool, bool]:
        first = asyncio.ensure_future(server.backend.trigger_chord(group, 1))
        await asyncio.sleep(0.3)
        blocked = not first.done()
        client.delete(CHORD_MUTEX)  # the Go worker releases it
        won = await first
        again = await server.backend.trigger_chord(group, 1)
        await server.backend.close()
        return blocked, won, again

    blocked, won, again = asyncio.run(scenario())
    assert blocked and won and not again
    assert json.loads(client.get(group))["ChordTriggered"] is True
    assert client.get(CHORD_MUTEX) is None  # released with the compare-and-delete script


# ---------------------------------------------------------------------------- a Redis that goes away


def test_worker_survives_a_redis_restart_and_loses_nothing(private_redis: PrivateRedis, queue_name: str) -> None:
    server = Server(
        Config(
            broker=private_redis.url,
            default_queue=queue_name,
            redis=RedisConfig(delayed_tasks_key=f"{queue_name}_delayed", normal_tasks_poll_period=200),
        )
    )

    redis_down = threading.Event()

    @server.task("slow_add")
    def slow_add(a: int, b: int) -> int:
        redis_down.wait(WAIT)
        return a + b

    with running_worker(server, concurrency=2):
        result = server.send_task(Signature("slow_add", [2, 3]))
        wait_until(lambda: result.state().state == "STARTED", what="task STARTED")
        private_redis.stop()
        redis_down.set()  # the task finishes while Redis is down: its outcome must wait, not vanish
        time.sleep(2.0)  # the length of the outage, not an expectation of speed
        private_redis.start()
        assert result.get(timeout=30) == 5
        # and the worker consumes again by itself
        assert server.send_task(Signature("slow_add", [1, 1])).get(timeout=30) == 2
    client = redis.Redis(port=private_redis.port)
    assert leftover_processing_lists(client, queue_name) == [] and client.llen(queue_name) == 0
    client.close()


def test_dead_letters_keep_binary_bodies_exactly(server: Server, client: redis.Redis, queue_name: str) -> None:
    body = b"\xff\xfe not utf-8 \n and a newline"
    client.rpush(queue_name, body)
    with running_worker(server, concurrency=1):
        wait_until(lambda: len(server.dead_letters()) == 1, what="the message dead-lettered")
    [letter] = server.dead_letters()
    assert letter.body == body and letter.queue == queue_name and "not JSON" in letter.reason
    assert server.requeue_dead() == 1
    assert client.lrange(queue_name, 0, -1) == [body]


# ---------------------------------------------------------------------------- the periodic lock


def test_redis_lock_is_go_compatible(redis_url: str, tmp_path: Path, queue_name: str) -> None:
    import redis

    server = Server(config_for("redis", tmp_path, queue_name))
    client = redis.Redis.from_url(REDIS_URL)
    key = unique("machinery_lock_gotest")
    try:
        deadline = now_ns() + 5 * 10**9
        assert run_sync(server.lock.lock(key, deadline)) is True
        assert client.get(key) == str(deadline).encode()  # the deadline as Go writes it
        assert 3000 < client.pttl(key) <= 5000  # expires at the deadline
        # Go took a tick whose deadline has passed but whose key has no TTL: ours takes it over.
        client.set(key, str(now_ns() - 10**9))
        assert run_sync(server.lock.lock(key, deadline)) is True
        assert client.get(key) == str(deadline).encode() and client.pttl(key) > 0
        # A live Go holder wins; so does a value that is not a deadline (Go's Atoi fails).
        client.set(key, str(now_ns() + 10 * 10**9))
        assert run_sync(server.lock.lock(key, deadline)) is False
        client.set(key, "garbage")
        assert run_sync(server.lock.lock(key, deadline)) is False
    finally:
        client.delete(key)
        client.close()
        server.close()


def test_go_chord_with_go_groupmeta_completes_with_88(server: Server, client: redis.Redis, queue_name: str) -> None:
    # The members and the GroupMeta exactly as Go's client wrote them to Redis.
    rec = register_workflow_tasks(server)
    queue = queue_name
    # One UUID mapping for the members and the GroupMeta Go wrote for them.
    members_text = (INTEROP_DIR / "redis_chord_tasks.jsonl").read_text().strip()
    meta_text = (INTEROP_DIR / "groupmeta.json").read_text().strip()
    for old in set(re.findall(r"(?:task|group|chord)_[0-9a-f-]{36}", members_text + meta_text)):
        new = f"{old.split('_', 1)[0]}_{uuid.uuid4()}"
        members_text, meta_text = members_text.replace(old, new), meta_text.replace(old, new)
    members = [
        m.replace('"RoutingKey":"machinery_tasks"', f'"RoutingKey":"{queue}"') for m in members_text.splitlines()
    ]
    group_uuid = json.loads(meta_text)["GroupUUID"]
    callback_uuid = json.loads(members[0])["ChordCallback"]["UUID"]
    client.set(group_uuid, meta_text, ex=3600)  # exactly Go's bytes
    with running_worker(server, concurrency=3):
        client.rpush(queue, *members)
        assert server.result(callback_uuid).get(WAIT) == 88
    assert rec.of("multiply") == [(2, 4, 11)]  # group order, as Go's worker published it
    stored = json.loads(client.get(group_uuid))
    assert list(stored) == ["GroupUUID", "TaskUUIDs", "ChordTriggered", "Lock", "CreatedAt", "TTL"]
    assert stored["ChordTriggered"] is True
    state = json.loads(client.get(callback_uuid))
    assert state["State"] == SUCCESS and state["Results"] == [{"Type": "int64", "Value": 88}]
    client.delete(group_uuid, callback_uuid, *(json.loads(m)["UUID"] for m in members))
