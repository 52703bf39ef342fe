"""The GCP Pub/Sub broker on Google's emulator, with its results in the shared Redis."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import pytest

from machinery import Config, GCPPubSubConfig, Server
from machinery.brokers.base import Consumer
from machinery.brokers.gcppubsub import GCPPubSubBroker, PubSubConsumer

from ..services import require_redis
from .base import Harness, make_config

PROJECT = "machinery-test"
#: Pub/Sub's shortest ack deadline: a dead consumer's messages come back after it.
TEST_ACK_DEADLINE = 10


class PubSubHarness(Harness):
    name: ClassVar[str] = "gcppubsub"
    backend: ClassVar[bool] = False
    lock: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("gcppubsub", "redis")
    gaps: ClassVar[dict[str, str]] = {
        "pending_excludes_delayed": "Pub/Sub holds a message back for its ETA in the subscription "
        "itself, so listing pending tasks (by receiving) shows it among the ready ones",
        "operations": "the operations seams (queue depth, purge, dead-letter count, ping) are not "
        "implemented on Pub/Sub yet: machinery inspect, purge, dead --purge and ping report "
        "UnsupportedOperation there",
        "delayed_count": "Pub/Sub cannot count a message held back for its ETA without pulling it",
        "delayed_inspection": "Pub/Sub cannot read a message held back for its ETA "
        "(get_delayed_tasks raises UnsupportedOperation)",
        "priorities": "Pub/Sub has no priorities: messages of any priority are delivered alike",
        "requeue_to_the_back": "Pub/Sub keeps no order without ordering keys, which Go's broker does not set",
        "empty_bodies": "Pub/Sub refuses a message with neither data nor attributes (UnsupportedOperation); "
        "every signature is JSON",
        "ordering": "Pub/Sub keeps no order without ordering keys, which Go's broker does not set: "
        "messages returned by a closing consumer come back in any order",
    }

    def setup(self) -> None:
        self.request.getfixturevalue("pubsub_emulator")
        self.redis_url: str = require_redis()

    def url(self, queue: str) -> str:
        return f"gcppubsub://{PROJECT}/{queue}-sub"

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {"gcppubsub": GCPPubSubConfig(ack_deadline=TEST_ACK_DEADLINE)}

    def config(self, queue: str, **overrides: Any) -> Config:
        fields: dict[str, Any] = {"result_backend": self.redis_url, "lock": self.redis_url, **overrides}
        return make_config(queue, broker=self, backend=self, **fields)

    @staticmethod
    def broker_of(server: Server) -> GCPPubSubBroker:
        assert isinstance(server.broker, GCPPubSubBroker)
        return server.broker

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        broker = self.broker_of(server)
        found = await broker._peek(queue, await broker.ensure_subscription(queue))
        return [bytes(m.message.data) for m in found]

    async def taken_count(self, server: Server, queue: str) -> int:
        pytest.skip("Pub/Sub reports no count of outstanding messages (only Cloud Monitoring does)")

    def abandon(self, consumer: Consumer) -> None:
        assert isinstance(consumer, PubSubConsumer)
        consumer.abandon()

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        await self.broker_of(server).delete_queue(queue)
        client = server.backend
        for uuid in ids:
            await client.purge_state(uuid)
            await client.purge_group_meta(uuid)
