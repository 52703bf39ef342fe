"""A Redis that restarts under a waiting client and a finishing task: nothing fails, nothing runs twice."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from machinery import Config, RedisConfig, Server, Signature
from machinery._sync import run_sync
from support.servers import PrivateRedis
from support.waiting import wait_until
from support.workers import running_worker

OUTAGE_WAIT = 60.0  # generous: only a broken worker or client takes this long


@pytest.fixture
def config(private_redis: PrivateRedis, queue_name: str) -> Config:
    return Config(
        broker=private_redis.url,
        default_queue=queue_name,
        results_expire_in=600,
        redis=RedisConfig(delayed_tasks_key=f"{queue_name}_delayed", normal_tasks_poll_period=200),
    )


@pytest.fixture
def client(config: Config) -> Iterator[Server]:
    server = Server(config)
    yield server
    server.close()


def subscribers(port: int, task_uuid: str) -> int:
    connection = redis.Redis(port=port)
    try:
        return int(
            dict(connection.pubsub_numsub(f"machinery:done:{task_uuid}"))[f"machinery:done:{task_uuid}".encode()]
        )
    finally:
        connection.close()


def test_a_waiting_get_rides_out_a_restart_and_the_task_runs_once(
    private_redis: PrivateRedis,
    config: Config,
    client: Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="machinery")
    worker_server = Server(config)
    gate = threading.Event()
    runs: list[int] = []

    @worker_server.task
    def gated(x: int) -> int:
        runs.append(x)
        gate.wait(OUTAGE_WAIT)
        return 2 * x

    outcome: dict[str, Any] = {}

    def wait_for_it(result: Any) -> None:
        try:
            outcome["value"] = result.get(timeout=OUTAGE_WAIT)
        except Exception as exc:
            outcome["error"] = exc

    with running_worker(worker_server):
        result = client.send_task(Signature("gated", [21]))
        wait_until(lambda: runs, what="the task running")
        waiter = threading.Thread(target=wait_for_it, args=(result,))
        waiter.start()
        wait_until(lambda: subscribers(private_redis.port, result.task_uuid) == 1, what="the client waiting")
        private_redis.stop()
        gate.set()  # the task finishes while Redis is down: its outcome must wait, not vanish
        wait_until(lambda: "storing the SUCCESS of gated" in caplog.text, OUTAGE_WAIT, "the worker holding the outcome")
        private_redis.start()
        waiter.join(OUTAGE_WAIT)
        assert not waiter.is_alive()
    worker_server.close()
    assert outcome == {"value": 42}
    assert runs == [21], "a task whose outcome waited for Redis must not run again"
    # The client said once that it was waiting out the outage, not once per retry.
    waiting = [r for r in caplog.records if f"Waiting for {result.task_uuid}: the result backend" in r.getMessage()]
    assert len(waiting) <= 1


def test_the_first_call_on_a_stale_pooled_connection_is_retried(
    private_redis: PrivateRedis,
    client: Server,
) -> None:
    assert client.get_pending_tasks() == []  # the pool now holds a connection
    assert run_sync(client.backend.get_group_meta("group_none")) is None
    private_redis.stop()
    private_redis.start()
    assert client.get_pending_tasks() == []
    assert run_sync(client.backend.get_group_meta("group_none")) is None
    sent = client.send_task(Signature("add", [1, 2]))
    state = sent.state()
    assert state is not None and state.state == "PENDING"
