"""Sending on Redis: with the broker and the backend on one server, the PENDING write and the
push are one script (one round trip), and the stored state and message are Go's as before."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from machinery import Config, RedisConfig, Server, Signature
from machinery.brokers.redis import _SEND, RedisBroker

pytestmark = pytest.mark.redis


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make(redis_url: str, queue: str, backend: str = "") -> Server:
    config = Config(
        broker=redis_url,
        result_backend=backend,
        default_queue=queue,
        redis=RedisConfig(delayed_tasks_key=f"{queue}_delayed"),
    )
    return Server(config)


def record_round_trips(server: Server) -> list[list[tuple[Any, ...]]]:
    """The commands of each round trip the running loop's auto-pipeline makes, in order."""
    broker = server.broker
    assert isinstance(broker, RedisBroker)
    pipeline = broker.connector.batched()
    trips: list[list[tuple[Any, ...]]] = []
    send_once = pipeline._send_once

    async def recording(commands: list[tuple[Any, ...]]) -> list[Any]:
        trips.append(list(commands))
        return await send_once(commands)

    pipeline._send_once = recording  # type: ignore[method-assign]
    return trips


async def test_send_on_one_redis_is_one_round_trip(
    redis_url: str, queue_name: str, redis_client: aioredis.Redis
) -> None:
    server = make(redis_url, queue_name)
    await server.asend_task(Signature("warm_up"))  # loads the script: NOSCRIPT costs a round trip once
    trips = record_round_trips(server)
    result = await server.asend_task(Signature("add", [1, 2]))
    try:
        assert [command[:2] for trip in trips for command in trip] == [("EVALSHA", _SEND.sha)] and len(trips) == 1
        state = json.loads(await redis_client.get(result.task_uuid))
        assert (state["TaskUUID"], state["TaskName"], state["State"]) == (result.task_uuid, "add", "PENDING")
        assert 0 < await redis_client.ttl(result.task_uuid) <= server.config.results_ttl
        bodies = await redis_client.lrange(queue_name, 0, -1)
        message = json.loads(bodies[-1])
        assert (message["UUID"], message["Name"], message["RoutingKey"]) == (result.task_uuid, "add", queue_name)
    finally:
        await redis_client.delete(queue_name)
        await server.aclose()


async def test_backend_on_another_database_writes_pending_there_first(
    redis_url: str, queue_name: str, redis_client: aioredis.Redis
) -> None:
    other = redis_url.rstrip("/").rsplit("/", 1)[0] + "/1"
    server = make(redis_url, queue_name, backend=other)
    results = aioredis.Redis.from_url(other)
    result = await server.asend_task(Signature("add", [1, 2]))
    try:
        assert json.loads(await results.get(result.task_uuid))["State"] == "PENDING"
        assert await redis_client.get(result.task_uuid) is None
        assert len(await redis_client.lrange(queue_name, 0, -1)) == 1
    finally:
        await redis_client.delete(queue_name)
        await results.delete(result.task_uuid)
        await results.aclose()
        await server.aclose()


async def test_prioritized_send_on_one_redis_keeps_its_place(
    redis_url: str, queue_name: str, redis_client: aioredis.Redis
) -> None:
    server = make(redis_url, queue_name)
    try:
        plain = await server.asend_task(Signature("add", [1]))
        urgent = await server.asend_task(Signature("add", [2], priority=5))
        names = [json.loads(body)["UUID"] for body in await redis_client.lrange(queue_name, 0, -1)]
        assert names == [urgent.task_uuid, plain.task_uuid]
        for sent in (plain, urgent):
            assert json.loads(await redis_client.get(sent.task_uuid))["State"] == "PENDING"
    finally:
        await redis_client.delete(queue_name)
        await server.aclose()


async def test_batches_one_after_another_share_one_connection(redis_url: str, queue_name: str) -> None:
    server = make(redis_url, queue_name)
    broker = server.broker
    assert isinstance(broker, RedisBroker)
    pipeline = broker.connector.batched()
    pool = broker.connector.client().connection_pool
    checkouts = 0
    get_connection = pool.get_connection

    async def counting() -> Any:
        nonlocal checkouts
        checkouts += 1
        return await get_connection()

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        ids = [await pipeline.execute("CLIENT", "ID") for _ in range(5)]
        # Kept between batches: redis-py's checkout and release cost a lone command as much
        # as its round trip.
        assert len(set(ids)) == 1 and checkouts == 1
    finally:
        await server.aclose()


async def test_a_kept_connection_the_server_closed_is_replaced_by_the_next_batch(
    redis_url: str, queue_name: str, redis_client: aioredis.Redis
) -> None:
    server = make(redis_url, queue_name)
    broker = server.broker
    assert isinstance(broker, RedisBroker)
    pipeline = broker.connector.batched()
    try:
        kept = await pipeline.execute("CLIENT", "ID")
        assert await redis_client.client_kill_filter(_id=kept) == 1
        result = await server.asend_task(Signature("add", [1, 2]))  # no error reaches the sender
        assert json.loads(await redis_client.get(result.task_uuid))["State"] == "PENDING"
        assert await pipeline.execute("CLIENT", "ID") != kept
    finally:
        await redis_client.delete(queue_name)
        await server.aclose()
