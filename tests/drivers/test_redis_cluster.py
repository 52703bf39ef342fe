"""What is specific to Redis Cluster: our keys share their queue's slot, the cross-slot moves
run in at-least-once steps, and a primary SIGKILLed mid-run loses no task and fires no chord
twice. (The behaviour every driver shares is the contract suite's.)"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from machinery import Chord, Config, Group, Server, Signature, TaskFailed
from machinery._sync import run_sync
from machinery.brokers import _redis_delayed
from machinery.brokers.redis import processing_prefix
from support.fixtures import unique
from support.redis_topologies import RedisClusterDeployment
from support.waiting import wait_until
from support.workers import running_worker

pytestmark = [pytest.mark.redis]

FAILOVER_TASKS = 2000
DEADLINE = 120.0


def cluster_config(deployment: RedisClusterDeployment, queue: str, **overrides: Any) -> Config:
    fields: dict[str, Any] = {
        "broker": deployment.url,
        "result_backend": deployment.url,
        "lock": deployment.url,
        "default_queue": queue,
        "results_expire_in": 600,
        "heartbeat_timeout": 3.0,
        "redis": deployment.redis_config(
            delayed_tasks_key=f"{queue}_delayed", delayed_tasks_poll_period=100, normal_tasks_poll_period=200
        ),
    }
    fields.update(overrides)
    return Config(**fields)


def test_tasks_eta_priorities_and_chords_on_a_cluster(redis_cluster_deployment: RedisClusterDeployment) -> None:
    queue = unique("cluster_q")
    server = Server(cluster_config(redis_cluster_deployment, queue))
    order: list[int] = []

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @server.task("total")
    def total(*values: int) -> int:
        return sum(values)

    @server.task("note")
    def note(n: int) -> None:
        order.append(n)

    try:
        # Prioritized messages sent before any worker runs come out highest first.
        for n, priority in [(0, 0), (1, 3), (2, 9), (3, 5)]:
            server.send_task(Signature("note", [n], priority=priority))
        soon = datetime.now(timezone.utc) + timedelta(seconds=0.5)
        delayed = server.send_task(Signature("add", [2, 3], eta=soon))
        with running_worker(server, concurrency=1):
            assert server.send_task(Signature("add", [1, 2])).get(timeout=DEADLINE) == 3
            assert delayed.get(timeout=DEADLINE) == 5
            chord = Chord(Group(*(Signature("add", [i, i]) for i in range(6))), Signature("total"))
            assert server.send_chord(chord).get(timeout=DEADLINE) == 30
            wait_until(lambda: len(order) == 4, what="the prioritized tasks run")
        assert order == [2, 3, 1, 0]
    finally:
        server.close()


def test_a_deferred_task_moves_through_gos_delayed_set_in_steps(
    redis_cluster_deployment: RedisClusterDeployment,
) -> None:
    queue = unique("cluster_defer")
    server = Server(cluster_config(redis_cluster_deployment, queue))
    assert server.broker.connector.cluster  # type: ignore[attr-defined]
    runs: list[float] = []

    @server.task("later")
    def later() -> str:
        runs.append(time.monotonic())
        if len(runs) == 1:
            from machinery import RetryTaskLater

            raise RetryTaskLater(0.3)
        return "done"

    try:
        with running_worker(server, concurrency=2):
            assert server.send_task(Signature("later", [])).get(timeout=DEADLINE) == "done"
        assert len(runs) == 2
        with redis_cluster_deployment.client() as client:
            assert client.zcard(f"{queue}_delayed") == 0 and client.llen(queue) == 0
    finally:
        server.close()


def test_a_mover_dying_between_steps_duplicates_never_loses(
    redis_cluster_deployment: RedisClusterDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lease due messages and stop there (a mover killed after its first step): once the lease
    ends, another mover moves them."""
    queue = unique("cluster_lease")
    delayed_key = f"{queue}_delayed"
    server = Server(cluster_config(redis_cluster_deployment, queue))
    connector = server.broker.connector  # type: ignore[attr-defined]
    body = Signature("x", [], routing_key=queue).encode()
    with redis_cluster_deployment.client() as client:
        client.zadd(delayed_key, {body: time.time_ns() - 1})

        async def lease_only() -> Any:
            now = time.time_ns()
            return await connector.run(_redis_delayed._LEASE_DUE, [delayed_key], [now, 10, now + int(0.5e9)])

        leased, _ = run_sync(lease_only())
        assert leased == [body]
        assert client.llen(queue) == 0 and client.zcard(delayed_key) == 1  # neither moved nor lost

        async def move() -> tuple[int, Any]:
            return await _redis_delayed.move_due_in_steps(connector, delayed_key, time.time_ns(), 10, queue)

        assert run_sync(move())[0] == 0  # still leased
        wait_until(lambda: run_sync(move())[0] == 1, timeout=10, what="the lease ending and the move")
        assert client.lrange(queue, 0, -1) == [body] and client.zcard(delayed_key) == 0
        client.delete(queue)
    server.close()


def test_a_message_deferred_again_while_its_move_is_in_flight_stays_delayed(
    redis_cluster_deployment: RedisClusterDeployment,
) -> None:
    """The mover leases a due message, pushes it, and a worker takes it, runs it and defers it
    again (the same bytes, a new score) before the mover's last step: that step must leave the
    new delayed copy alone, or the message is in neither the queue nor the set."""
    queue = unique("cluster_redefer")
    delayed_key = f"{queue}_delayed"
    server = Server(cluster_config(redis_cluster_deployment, queue))
    connector = server.broker.connector  # type: ignore[attr-defined]
    body = Signature("x", [], routing_key=queue).encode()
    with redis_cluster_deployment.client() as client:
        client.zadd(delayed_key, {body: time.time_ns() - 1})
        deferred_again = time.time_ns() + int(3600e9)

        async def move_with_a_redefer_before_removal() -> None:
            now = time.time_ns()
            leased, _ = await connector.run(_redis_delayed._LEASE_DUE, [delayed_key], [now, 10, now + int(60e9)])
            assert leased == [body]
            # What the worker does between the push and the removal: defer it again.
            await connector.batched().execute("ZADD", delayed_key, deferred_again, body)
            removed = await connector.run(_redis_delayed._REMOVE_LEASED, [delayed_key], [now + int(60e9), *leased])
            assert removed == 0

        run_sync(move_with_a_redefer_before_removal())
        assert client.zscore(delayed_key, body) == float(deferred_again)
        client.delete(delayed_key)
    server.close()


def settled(deployment: RedisClusterDeployment, queue: str) -> bool:
    """Nothing left on ``queue``, in its delayed set, or taken by a consumer."""
    with deployment.client() as client:
        if client.llen(queue) or client.zcard(f"{queue}_delayed"):
            return False
        return not any(client.llen(key) for key in client.scan_iter(match=processing_prefix(queue) + "*"))


def _kill_primary_when(
    deployment: RedisClusterDeployment, key: str, ready: threading.Event, progress: Any = None
) -> threading.Thread:
    """SIGKILL the primary serving ``key`` once ``ready`` is set; ``progress`` (if given) is
    called right after, to note how far the run had got."""

    def killer() -> None:
        ready.wait(DEADLINE)
        deployment.primary_of(key).kill()
        if progress is not None:
            progress()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_primary_sigkilled_mid_run_loses_no_task(
    own_redis_cluster: RedisClusterDeployment, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = unique("cluster_failover")
    server = Server(cluster_config(own_redis_cluster, queue))
    runs: Counter[str] = Counter()
    guard = threading.Lock()
    quarter = threading.Event()

    @server.task("work")
    def work(n: int) -> int:
        with guard:
            runs[str(n)] += 1
            if len(runs) >= FAILOVER_TASKS // 4:
                quarter.set()
        return n

    try:
        results = [server.send_task(Signature("work", [n])) for n in range(FAILOVER_TASKS)]
        killed = own_redis_cluster.primary_of(queue).port
        done_at_kill: list[int] = []
        killer = _kill_primary_when(own_redis_cluster, queue, quarter, lambda: done_at_kill.append(len(runs)))
        with running_worker(server, concurrency=32):
            wait_until(lambda: len(runs) == FAILOVER_TASKS, timeout=DEADLINE, what="every task running")
            killer.join(5)
            values = [r.get(timeout=DEADLINE) for r in results]
        assert done_at_kill[0] < FAILOVER_TASKS  # killed mid-run
        assert values == list(range(FAILOVER_TASKS))
        assert own_redis_cluster.primary_of(queue).port != killed  # a replica took over
        duplicates = sum(runs.values()) - FAILOVER_TASKS
        record_property("duplicates", duplicates)
        with capsys.disabled():
            print(f"\n[cluster failover] {FAILOVER_TASKS} tasks, all complete, {duplicates} ran twice")
    finally:
        server.close()


@pytest.mark.slow
def test_chords_fire_exactly_once_across_a_failover(own_redis_cluster: RedisClusterDeployment) -> None:
    """No chord's callback runs twice. A member state the dying primary acknowledged but had not
    yet replicated is lost, as Redis replication loses it (the bound the README states): that
    chord then fails with "its state is gone" (or "its group metadata is gone") and its callback is
    never sent, which is reported, not hidden. (Acknowledged writes cannot be used here: after the
    failover the new primary has no replica left to acknowledge them.)"""
    queue = unique("cluster_chords")
    server = Server(cluster_config(own_redis_cluster, queue))
    callbacks: Counter[str] = Counter()
    guard = threading.Lock()
    started = threading.Event()
    members = 0

    @server.task("member")
    def member(n: int) -> int:
        nonlocal members
        with guard:
            members += 1
            if members >= 100:
                started.set()
        time.sleep(0.002)
        return n

    @server.task("callback")
    def callback(tag: str, *values: int) -> int:
        with guard:
            callbacks[tag] += 1
        return sum(values)

    chords = 60
    try:
        sent = [
            server.send_chord(
                Chord(Group(*(Signature("member", [i]) for i in range(5))), Signature("callback", [f"c{k}"]))
            )
            for k in range(chords)
        ]
        # The group metadata of some chords lives on the primary that dies. What was sent is on
        # the replicas before the run starts: a send lost to replication lag (its message, its
        # members' PENDING, its metadata) would be a chord that never completes, which is the
        # bound Redis sets, not what this test is about.
        own_redis_cluster.replicate_everything()
        done_at_kill: list[int] = []
        killer = _kill_primary_when(
            own_redis_cluster, queue, started, lambda: done_at_kill.append(sum(callbacks.values()))
        )
        with running_worker(server, concurrency=16):
            lost: list[int] = []
            for k, result in enumerate(sent):
                try:
                    assert result.get(timeout=DEADLINE) == 10
                except TaskFailed as exc:  # a write of the run lost to replication, nothing else
                    assert "its state is gone" in str(exc) or "its group metadata is gone" in str(exc)
                    lost.append(k)
            killer.join(5)
            # Every message settled: a second callback, had one been sent, has run by now.
            wait_until(lambda: settled(own_redis_cluster, queue), timeout=DEADLINE, what="every message settled")
        assert done_at_kill[0] < chords  # killed with chords still to complete
        print(f"chords lost to the failover's unreplicated writes: {len(lost)} of {chords}")
        assert len(lost) < chords // 2
        assert callbacks == Counter({f"c{k}": 1 for k in range(chords) if k not in lost})
    finally:
        server.close()


def test_acknowledged_writes_wait_on_each_node(redis_cluster_deployment: RedisClusterDeployment) -> None:
    """On a cluster the WAIT goes to every node a batch wrote to, on the same connection."""
    from machinery.errors import ReplicationError

    queue = unique("cluster_ack")
    config = cluster_config(redis_cluster_deployment, queue)
    config.redis.min_replicas_acked = 1
    server = Server(config)

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @server.task("total")
    def total(*values: int) -> int:
        return sum(values)

    try:
        with running_worker(server, concurrency=2):
            chord = Chord(Group(*(Signature("add", [i, 1]) for i in range(4))), Signature("total"))
            assert server.send_chord(chord).get(timeout=DEADLINE) == 10
    finally:
        server.close()
    config = cluster_config(redis_cluster_deployment, queue)
    config.redis.min_replicas_acked, config.redis.replicas_ack_timeout = 2, 50
    server = Server(config)
    try:
        with pytest.raises(ReplicationError, match="only 1 of the 2 replica"):
            server.send_task(Signature("add", [1, 1]))
    finally:
        server.close()


@pytest.mark.slow
def test_completion_notices_come_back_after_their_node_dies(own_redis_cluster: RedisClusterDeployment) -> None:
    """A waiter's completion channel lives on one node; when that node is SIGKILLed the
    listener finds the cluster again, and a completion written after the failover still wakes
    the waiter (its re-read interval is made an hour, so only a notice can)."""
    import asyncio

    from machinery.state import PENDING, SUCCESS, TaskState

    queue = unique("cluster_notices")
    waiting, writing = (
        Server(cluster_config(own_redis_cluster, queue)),
        Server(cluster_config(own_redis_cluster, queue)),
    )
    backend: Any = waiting.backend
    backend.poll_interval = 3600.0
    uuid = unique("task")

    async def scenario() -> TaskState:
        await writing.backend.write_states([TaskState(uuid, PENDING, "f")], False)
        waiter = asyncio.ensure_future(backend.await_state(uuid, timeout=DEADLINE))

        def subscribed() -> bool:
            listener = backend._listeners.peek()
            return bool(listener and uuid in listener._counts and not listener._subscribed and listener._reader)

        while not subscribed():  # noqa: ASYNC110  (state of another object, no event to wait on)
            await asyncio.sleep(0.01)
        port = int(backend._listeners.peek()._pubsub.get_pubsub_node().port)
        node = next(n for n in own_redis_cluster.nodes if n.port == port)
        await asyncio.to_thread(node.kill)
        await asyncio.to_thread(own_redis_cluster.wait_healthy)
        from machinery._backoff import persist

        await persist(lambda: writing.backend.write_states([TaskState(uuid, SUCCESS, "f")], True), "writing")
        return await waiter

    try:
        assert run_sync(scenario()).state == SUCCESS
    finally:
        waiting.close()
        writing.close()


def test_go_messages_on_gos_keys_run_on_a_cluster(redis_cluster_deployment: RedisClusterDeployment) -> None:
    """A Go client's message on the queue list and a Go ETA member in the delayed set (captured
    from Go, pointed at this test's queue) run, and the states land under the bare task UUIDs
    as Go's JSON, where a Go client on the cluster reads them."""
    import json

    from support.interop import INTEROP_DIR

    queue = unique("cluster_go")
    server = Server(cluster_config(redis_cluster_deployment, queue))

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    now = json.loads((INTEROP_DIR / "redis_task_add.json").read_text())
    later = json.loads((INTEROP_DIR / "redis_task_eta_zadd.json").read_text())["member"]
    now["RoutingKey"] = later["RoutingKey"] = queue
    try:
        with redis_cluster_deployment.client() as client:
            client.delete(now["UUID"], later["UUID"])
            client.rpush(queue, json.dumps(now))
            client.zadd(f"{queue}_delayed", {json.dumps(later): time.time_ns()})  # due now
            with running_worker(server, concurrency=2):
                for uuid in (now["UUID"], later["UUID"]):
                    stored = wait_until(lambda u=uuid: client.get(u), timeout=DEADLINE, what=f"{uuid} stored")
                    wait_until(
                        lambda u=uuid: json.loads(client.get(u) or b"{}").get("State") == "SUCCESS",
                        timeout=DEADLINE,
                        what=f"{uuid} done",
                    )
                    assert list(json.loads(stored)) == [
                        "TaskUUID",
                        "TaskName",
                        "State",
                        "Results",
                        "Error",
                        "CreatedAt",
                        "TTL",
                    ]
            assert json.loads(client.get(now["UUID"]))["Results"] == [{"Type": "int64", "Value": 2}]
            client.delete(now["UUID"], later["UUID"])
    finally:
        server.close()
