"""The SQS broker on moto's server, with its results in DynamoDB Local (``sqs``), as a user on
AWS would run it; ``SQSBrokerHarness`` is the broker alone, for pairing with other backends."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

from machinery import Config, Server, SQSConfig
from machinery.brokers.base import Consumer
from machinery.brokers.sqs import SQSBroker, SQSConsumer

from ..cloud import ACCOUNT, LocalServer
from .base import Harness, make_config
from .dynamodb import DynamoDBHarness

#: Short enough for the redelivery tests to see a dead consumer's messages come back soon.
TEST_VISIBILITY = 4


class SQSBrokerHarness(Harness):
    """The SQS broker alone; the lock falls to the backend's (or memory)."""

    name: ClassVar[str] = "sqs"
    backend: ClassVar[bool] = False
    lock: ClassVar[bool] = False
    marks: ClassVar[tuple[str, ...]] = ("sqs", "dynamodb")
    companion: ClassVar[str] = "dynamodb"
    gaps: ClassVar[dict[str, str]] = {
        "delayed_inspection": "SQS cannot read a delayed message before its delay ends "
        "(get_delayed_tasks raises UnsupportedOperation)",
        "priorities": "SQS queues have no priorities: messages of any priority are taken in arrival order",
        "requeue_to_the_back": "a standard SQS queue keeps no order: a message made visible again is "
        "received whenever SQS picks it, not after those behind it",
        "stale_ack": "SQS deletes a message by any of its receipt handles, the dead consumer's old one "
        "too (AWS: the request succeeds and the message may or may not be deleted); the live "
        "consumer's run of it still stores its state",
        "empty_bodies": "an SQS body needs at least one character (UnsupportedOperation); every signature is JSON",
        "non_text_bodies": "an SQS body is non-empty XML text: an empty body, bytes that are not UTF-8 or "
        "characters such as NUL cannot be sent (UnsupportedOperation); every signature, Go's too, is JSON",
    }

    unpromised: ClassVar[dict[str, str]] = {
        "exclusive_delivery": "a standard SQS queue delivers at least once and may hand one message "
        "to two receivers (AWS documents it; moto's threaded server does it under load); the "
        "worker's states and chord trigger are written to bear a second run",
    }
    load_scale: ClassVar[float] = 0.25

    def setup(self) -> None:
        self.server: LocalServer = self.request.getfixturevalue("moto_server")
        os.environ["DISABLE_STRICT_SQS_CHECK"] = "1"  # moto's queue URLs are http://127.0.0.1:PORT/ACCOUNT/NAME

    def url(self, queue: str) -> str:
        return f"{self.server.url}/{ACCOUNT}"

    def config_overrides(self, queue: str) -> dict[str, Any]:
        return {"sqs": SQSConfig(create_missing=True, visibility_timeout=TEST_VISIBILITY, wait_time_seconds=1)}

    @staticmethod
    def broker_of(server: Server) -> SQSBroker:
        assert isinstance(server.broker, SQSBroker)
        return server.broker

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        return [body for _, body, _ in await self.broker_of(server)._peek(queue)]

    async def taken_count(self, server: Server, queue: str) -> int:
        _, in_flight, _ = await self.broker_of(server).queue_counts(queue)
        return in_flight

    def abandon(self, consumer: Consumer) -> None:
        assert isinstance(consumer, SQSConsumer)
        consumer.abandon()

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        await self.broker_of(server).delete_queue(queue)


class SQSHarness(SQSBrokerHarness):
    """SQS for messages, DynamoDB for states, groups and locks."""

    name: ClassVar[str] = "sqs+dynamodb"
    backend: ClassVar[bool] = True
    lock: ClassVar[bool] = True
    marks: ClassVar[tuple[str, ...]] = ("sqs", "dynamodb")

    def setup(self) -> None:
        super().setup()
        self.results = DynamoDBHarness(self.request, self.tmp_path)
        self.results.setup()

    def config(self, queue: str, **overrides: Any) -> Config:
        return make_config(queue, broker=self, backend=self.results, **overrides)

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        return await self.results.expiry(server, task_uuid)

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        ids = list(ids)
        await super().cleanup(server, queue, ids)
        await self.results.cleanup(server, queue, ids)
