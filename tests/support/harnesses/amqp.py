"""RabbitMQ (the shared server) as broker and result backend, in Go Machinery's topology.

Each test has an exchange, binding key and queue of its own (named after the test's queue) and
deletes them afterwards with every result, group and dead-letter queue it made; delay queues
expire by themselves (``x-expires`` twice their delay). RabbitMQ has no lock: the lock is the
companion's.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import aio_pika

from machinery import AMQPConfig, Server
from machinery._sync import run_sync
from machinery.backends.amqp import chord_triggered_queue
from machinery.backends.amqp.groups import group_lock_queue, meta_queue
from machinery.brokers.amqp import AMQPBroker, dead_letter_queue
from machinery.brokers.base import Consumer

from ..services import AMQP_URL, amqp_vhost, rabbitmqctl, require_amqp
from .base import Harness


class AMQPHarness(Harness):
    name: ClassVar[str] = "amqp"
    lock: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("amqp",)
    gaps: ClassVar[dict[str, str]] = {
        "delayed_count": "RabbitMQ keeps delayed tasks in one queue per delay, which AMQP cannot find to count",
        "delayed_inspection": "RabbitMQ keeps delayed tasks in one queue per delay, which AMQP cannot list "
        "(get_delayed_tasks raises UnsupportedOperation)",
        "requeue_to_the_back": "RabbitMQ puts a nacked message back at its original position, not at the back",
        "priorities": "a RabbitMQ queue orders by priority only when declared with x-max-priority, "
        "which Go's topology does not declare",
    }

    def setup(self) -> None:
        require_amqp()
        self._closing: set[asyncio.Future[None]] = set()

    def url(self, queue: str) -> str:
        return AMQP_URL

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {"amqp": AMQPConfig(exchange=f"{queue}_ex", binding_key=f"{queue}_key")}

    def prepare(self, server: Server, queue: str) -> None:
        # With Go's topology a task published before any worker declared the queue only reaches
        # the publisher-side queue: declare the workers' queue as a deployment would have it.
        async def declare() -> None:
            consumer = await server.broker.open_consumer(queue, "test-setup", prefetch=1)
            await consumer.close()

        run_sync(declare())

    @staticmethod
    def _broker(server: Server) -> AMQPBroker:
        assert isinstance(server.broker, AMQPBroker)
        return server.broker

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        return [incoming.body for incoming in await self._broker(server)._peek(queue, f"inspecting {queue!r}")]

    async def taken_count(self, server: Server, queue: str) -> int:
        # AMQP itself cannot count another consumer's unacked deliveries; RabbitMQ's CLI can.
        out = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", amqp_vhost(), "name", "messages_unacknowledged")
        for line in out.splitlines():
            name, _, count = line.partition("\t")
            if name == queue:
                return int(count)
        return 0

    def abandon(self, consumer: Consumer) -> None:
        # A SIGKILLed worker's connection drops without a nack: RabbitMQ redelivers what it held.
        connection = consumer._connection  # type: ignore[attr-defined]
        consumer._closed = True  # type: ignore[attr-defined]
        consumer._connection = consumer._channel = consumer._amqp_queue = None  # type: ignore[attr-defined]
        if connection is not None:
            closing = asyncio.ensure_future(connection.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        import pytest

        pytest.skip("RabbitMQ result queues expire by x-expires, which restarts on every use: no time left to read")

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        names = [queue, f"{queue}_key", dead_letter_queue(queue)]
        # Delay queues (delay.<ms>.<exchange>.<routing key>) expire by themselves after twice
        # their delay; only a long one is worth finding, which AMQP cannot list and the CLI can.
        long_delay = self.latest_eta is not None and self.latest_eta > datetime.now(timezone.utc) + timedelta(minutes=1)
        if long_delay and shutil.which("rabbitmqctl"):
            listed = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", amqp_vhost(), "name")
            names += [name for name in listed.split() if f".{queue}_ex." in name]
        for some_id in ids:
            names += [some_id, meta_queue(some_id), chord_triggered_queue(some_id), group_lock_queue(some_id)]
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            underlay = await channel.get_underlay_channel()
            await asyncio.gather(*(underlay.queue_delete(name) for name in names))
            await underlay.exchange_delete(f"{queue}_ex")
        finally:
            await connection.close()
