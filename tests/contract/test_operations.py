"""The operations seam (brokers/base.py, backends/base.py) on every driver: queue depth, delayed
count, purge, dead-letter count and purge, ping. What ``machinery inspect``, ``purge``, ``dead
--purge``, ``ping``, the metrics and the dashboard are built on."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from machinery import Server, Signature
from machinery.brokers.base import Delivery
from machinery.brokers.redis import RedisBroker
from support.deployment import Deployment
from support.fixtures import unique


@pytest.fixture
def server(broker_deployment: Deployment) -> Server:
    return broker_deployment.server()


async def publish(server: Server, count: int) -> list[Signature]:
    signatures = [Signature("noop", uuid=unique("task")) for _ in range(count)]
    await server.broker.publish_many(signatures)
    return signatures


@pytest.mark.known_gap("operations")
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


@pytest.mark.known_gap("operations")
async def test_an_unknown_queue_is_empty(server: Server) -> None:
    name = unique("never_used")
    assert await server.broker.queue_depth(name) == 0
    assert await server.broker.purge(name) == 0
    assert await server.broker.dead_count(name) == 0
    assert await server.broker.purge_dead(name) == 0


@pytest.mark.known_gap("operations")
async def test_dead_letters_are_counted_and_purged(server: Server) -> None:
    broker, queue = server.broker, server.config.default_queue
    await publish(server, 2)
    consumer = await broker.open_consumer(queue, "ops-test", prefetch=2)
    try:
        taken: list[Delivery] = []
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


@pytest.mark.known_gap("operations")
async def test_the_broker_answers_a_ping(server: Server) -> None:
    await server.broker.ping()


async def test_the_backend_answers_a_ping(backend_deployment: Deployment) -> None:
    await backend_deployment.server().backend.ping()


@pytest.mark.known_gap("delayed_count")
async def test_delayed_messages_are_counted_per_queue(server: Server) -> None:
    broker, queue = server.broker, server.config.default_queue
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    signatures = [Signature("noop", uuid=unique("task"), eta=later) for _ in range(2)]
    await broker.publish_many([*signatures, Signature("noop", uuid=unique("task"), eta=later, routing_key=unique("o"))])
    try:
        assert await broker.delayed_count(queue) == 2
        assert await broker.queue_depth(queue) == 0
    finally:
        if isinstance(broker, RedisBroker):  # the delayed set is this test's own key
            await broker.connector.client().delete(broker.delayed_key)
