"""What is specific to Sentinel: the client finds the primary through the Sentinels, and after
the primary is SIGKILLed mid-run the workers follow the promoted replica with no task lost."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from machinery import Chord, Config, Group, RedisConfig, Server, Signature
from support.fixtures import unique
from support.redis_topologies import RedisSentinelDeployment
from support.waiting import wait_until
from support.workers import running_worker

pytestmark = [pytest.mark.redis]

FAILOVER_TASKS = 2000
DEADLINE = 120.0


def sentinel_config(deployment: RedisSentinelDeployment, queue: str, **overrides: Any) -> Config:
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


def test_tasks_and_chords_through_the_sentinels(redis_sentinel_deployment: RedisSentinelDeployment) -> None:
    queue = unique("sentinel_q")
    server = Server(sentinel_config(redis_sentinel_deployment, queue))

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @server.task("total")
    def total(*values: int) -> int:
        return sum(values)

    try:
        with running_worker(server, concurrency=4):
            assert server.send_task(Signature("add", [1, 2])).get(timeout=DEADLINE) == 3
            chord = Chord(Group(*(Signature("add", [i, i]) for i in range(4))), Signature("total"))
            assert server.send_chord(chord).get(timeout=DEADLINE) == 12
        # Everything went to the primary the Sentinels name.
        assert redis_sentinel_deployment.client().llen(queue) == 0
    finally:
        server.close()


def test_the_sentinel_password_is_used_and_a_wrong_one_refused(
    redis_sentinel_deployment: RedisSentinelDeployment,
) -> None:
    """The deployment's Sentinels require a password of their own (``sentinel_password``) and
    the primary another (the URL's); with the wrong Sentinel password no primary is found."""
    queue = unique("sentinel_auth")
    config = sentinel_config(redis_sentinel_deployment, queue)
    config.redis.sentinel_password = "wrong"
    server = Server(config)
    try:
        with pytest.raises(Exception, match=r"No master found for 'mymaster'.*AuthenticationError"):
            server.send_task(Signature("add", [1, 2]))
    finally:
        server.close()


def test_an_unknown_master_name_is_an_error_naming_it(redis_sentinel_deployment: RedisSentinelDeployment) -> None:
    """The Sentinels are asked for the primary of ``master_name``; a name they do not watch is
    an error that names it, not a silent wait."""
    queue = unique("sentinel_auth")
    config = sentinel_config(redis_sentinel_deployment, queue)
    config.redis = RedisConfig(master_name="no-such-master", sentinel_password=config.redis.sentinel_password)
    server = Server(config)
    try:
        with pytest.raises(Exception, match="no-such-master"):
            server.send_task(Signature("add", [1, 2]))
    finally:
        server.close()


@pytest.mark.slow
def test_primary_sigkilled_mid_run_the_workers_follow_the_new_primary(
    own_redis_sentinel: RedisSentinelDeployment, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = unique("sentinel_failover")
    server = Server(sentinel_config(own_redis_sentinel, queue))
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
        first = own_redis_sentinel.primary()

        done_at_kill: list[int] = []

        def killer() -> None:
            quarter.wait(DEADLINE)
            first.kill()
            done_at_kill.append(len(runs))

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        with running_worker(server, concurrency=32):
            wait_until(lambda: len(runs) == FAILOVER_TASKS, timeout=DEADLINE, what="every task running")
            values = [r.get(timeout=DEADLINE) for r in results]
        thread.join(5)
        assert not first.alive() and done_at_kill[0] < FAILOVER_TASKS  # killed mid-run
        assert values == list(range(FAILOVER_TASKS))
        wait_until(lambda: own_redis_sentinel.primary().port != first.port, timeout=DEADLINE, what="a new primary")
        duplicates = sum(runs.values()) - FAILOVER_TASKS
        record_property("duplicates", duplicates)
        with capsys.disabled():
            print(f"\n[sentinel failover] {FAILOVER_TASKS} tasks, all complete, {duplicates} ran twice")
    finally:
        server.close()


def test_acknowledged_writes_wait_for_the_replica(redis_sentinel_deployment: RedisSentinelDeployment) -> None:
    """With ``min_replicas_acked`` each batch of writes ends with WAIT: one replica confirms
    and the task runs; asking for two, which this deployment lacks, fails the write with a
    ReplicationError instead of pretending it is safe."""
    from machinery.errors import ReplicationError

    queue = unique("sentinel_ack")
    config = sentinel_config(redis_sentinel_deployment, queue)
    config.redis.min_replicas_acked = 1
    server = Server(config)

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    try:
        with running_worker(server, concurrency=2):
            assert server.send_task(Signature("add", [2, 2])).get(timeout=DEADLINE) == 4
    finally:
        server.close()
    config = sentinel_config(redis_sentinel_deployment, queue)
    config.redis.min_replicas_acked, config.redis.replicas_ack_timeout = 2, 50
    server = Server(config)
    try:
        with pytest.raises(ReplicationError, match="only 1 of the 2 replica"):
            server.send_task(Signature("add", [1, 1]))
    finally:
        server.close()
