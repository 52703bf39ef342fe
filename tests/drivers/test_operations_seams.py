"""The operations seam on every broker and backend: queue depth, purge, dead-letter purge, ping.

(Cross-driver: this moves to tests/contract once the contract suite's harnesses land.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from machinery import AMQPConfig, Config, Server, Signature
from machinery.brokers.amqp import AMQPBroker
from machinery.brokers.redis import RedisBroker
from machinery.errors import BrokerConnectionError, UnsupportedOperation
from support.configs import config_for
from support.fixtures import unique
from support.services import AMQP_URL, require_service

KINDS = ["memory", "sqlite", "redis", "amqp"]


def make_config(kind: str, tmp_path: Path, queue: str) -> Config:
    if kind == "amqp":
        require_service("RabbitMQ", AMQP_URL, 5672)
        return Config(
            broker=AMQP_URL,
            result_backend=AMQP_URL,
            default_queue=queue,
            amqp=AMQPConfig(exchange=f"{queue}_ex", binding_key=queue),
        )
    return config_for(kind, tmp_path, queue)


@pytest.fixture(params=KINDS)
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Server]:
    queue = unique("ops")
    made = Server(make_config(str(request.param), tmp_path, queue))
    yield made
    try:
        await made.broker.delete_queue(queue)
    finally:
        await made.broker.close()
        await made.backend.close()


async def publish(server: Server, count: int) -> list[Signature]:
    signatures = [Signature("noop", uuid=unique("task")) for _ in range(count)]
    await server.broker.publish_many(signatures)
    return signatures


async def test_depth_counts_ready_messages_and_purge_leaves_taken_ones(server: Server) -> None:
    broker, queue = server.broker, server.config.default_queue
    await publish(server, 3)
    assert await broker.queue_depth(queue) == 3
    consumer = await broker.open_consumer(queue, "ops-test", prefetch=1)
    try:
        taken = []
        while not taken:
            taken = await consumer.fetch(1, timeout=5)
        assert await broker.queue_depth(queue) == 2
        assert await broker.purge(queue) == 2
        assert await broker.queue_depth(queue) == 0
        # The message a worker holds is not purged: given back, it waits again.
        await consumer.requeue(taken[0])
    finally:
        await consumer.close()  # RabbitMQ may have pushed it to this consumer again: that returns it
    assert await broker.queue_depth(queue) == 1


async def test_an_unknown_queue_is_empty(server: Server) -> None:
    name = unique("never_used")
    assert await server.broker.queue_depth(name) == 0
    assert await server.broker.purge(name) == 0
    assert await server.broker.dead_count(name) == 0
    assert await server.broker.purge_dead(name) == 0


async def test_dead_letters_are_counted_and_purged(server: Server) -> None:
    broker, queue = server.broker, server.config.default_queue
    await publish(server, 2)
    consumer = await broker.open_consumer(queue, "ops-test", prefetch=2)
    try:
        taken: list = []
        while len(taken) < 2:
            taken += await consumer.fetch(2 - len(taken), timeout=5)
        for delivery in taken:
            await consumer.dead_letter(delivery, "test")
    finally:
        await consumer.close()
    assert await broker.dead_count(queue) == 2
    assert await broker.purge_dead(queue) == 2
    assert await broker.dead_count(queue) == 0
    assert await broker.dead_letters(queue) == []


async def test_ping_answers(server: Server) -> None:
    await server.broker.ping()
    await server.backend.ping()


def _redis_down() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.ConnectionError,)


@pytest.mark.parametrize(
    ("url", "errors"),
    [("redis://127.0.0.1:1/0", _redis_down()), ("amqp://guest:guest@127.0.0.1:1/", (BrokerConnectionError,))],
    ids=["redis", "amqp"],
)
async def test_ping_raises_when_nothing_answers(url: str, errors: tuple[type[BaseException], ...]) -> None:
    server = Server(Config(broker=url))
    with pytest.raises(errors):
        await server.broker.ping()
    with pytest.raises(errors):
        await server.backend.ping()


async def test_delayed_messages_are_counted_per_queue(server: Server) -> None:
    broker, queue = server.broker, server.config.default_queue
    if isinstance(broker, AMQPBroker):
        with pytest.raises(UnsupportedOperation, match="rabbitmqctl"):
            await broker.delayed_count(queue)
        return
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    signatures = [Signature("noop", uuid=unique("task"), eta=later) for _ in range(2)]
    await broker.publish_many([*signatures, Signature("noop", uuid=unique("task"), eta=later, routing_key=unique("o"))])
    try:
        assert await broker.delayed_count(queue) == 2
        assert await broker.queue_depth(queue) == 0
    finally:
        if isinstance(broker, RedisBroker):  # the delayed set is this test's own key
            await broker.connector.client().delete(broker.delayed_key)
