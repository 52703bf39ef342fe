"""Nothing the Redis broker writes for itself outlives the workers, unless it holds messages."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from machinery import Server, Signature
from machinery.brokers.redis import heartbeats_key
from support.configs import config_for
from support.services import REDIS_URL
from support.waiting import WAIT
from support.workers import running_worker


@pytest.fixture
def server(redis_url: str, tmp_path: Path, queue_name: str) -> Iterator[Server]:
    server = Server(config_for("redis", tmp_path, queue_name, heartbeat_timeout=1.0))
    yield server
    server.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    yield connection
    connection.close()


def test_the_heartbeat_set_expires_after_the_last_worker_stops(server: Server, client: redis.Redis) -> None:
    key = heartbeats_key(server.config.default_queue)
    with running_worker(server):
        assert client.pttl(key) == -1  # a beating worker keeps it
    assert client.pttl(key) > 0  # and it goes once nobody beats


def test_the_heartbeat_set_stays_while_a_dead_consumer_holds_messages(server: Server, client: redis.Redis) -> None:
    queue = server.config.default_queue
    key = heartbeats_key(queue)
    task_uuid = f"task_{queue}"

    async def take_and_die_then_close_another() -> None:
        await server.broker._push([(queue, Signature("add", [1, 2], uuid=task_uuid).encode())])
        dead = await server.broker.open_consumer(queue, "dead")
        assert len(await dead.fetch(1, 1.0)) == 1
        for task in dead._background:  # type: ignore[attr-defined]  # it stops beating, as if SIGKILLed
            task.cancel()
        other = await server.broker.open_consumer(queue, "other")
        await other.close()
        await server.broker.close()

    asyncio.run(take_and_die_then_close_another())
    assert client.pttl(key) == -1, "its message waits there for the next reaper"
    server.register_task("add", lambda *args: sum(args))
    with running_worker(server):  # a worker that starts later returns it (its heartbeat is over), and runs it
        assert server.result(task_uuid).get(timeout=WAIT) == 3
    assert client.llen(queue) == 0 and client.pttl(key) > 0
