"""The drivers the contract suite runs on: one ``Harness`` per driver, and the pairs to deploy.

Adding a driver to the suite is one harness module here and one line in ``HARNESSES``; a
broker-only or backend-only driver is paired with its ``companion`` for the seams it lacks,
and any further broker/backend pair worth running goes into ``DEPLOYMENTS``.
"""

from __future__ import annotations

from .amqp import AMQPHarness
from .base import Harness
from .dynamodb import DynamoDBHarness
from .memcache import MemcacheHarness
from .memory import MemoryHarness
from .mongo import MongoHarness
from .pubsub import PubSubHarness
from .redis import RedisHarness
from .redis_cluster import RedisClusterHarness
from .redis_sentinel import RedisSentinelHarness
from .sqlite import SQLiteHarness
from .sqs import SQSBrokerHarness

#: Every driver of the suite by name.
HARNESSES: dict[str, type[Harness]] = {
    harness.name: harness
    for harness in (
        MemoryHarness,
        SQLiteHarness,
        RedisHarness,
        AMQPHarness,
        SQSBrokerHarness,  # paired with DynamoDB: ("sqs", "dynamodb")
        DynamoDBHarness,
        PubSubHarness,  # paired with Redis: ("gcppubsub", "redis")
        RedisClusterHarness,
        RedisSentinelHarness,
        MemcacheHarness,
        MongoHarness,
    )
}

#: (broker, result backend) pairs beyond each driver with itself: the ``deployment`` fixture
#: runs every driver that serves both seams on its own, then these.
EXTRA_DEPLOYMENTS: list[tuple[str, str]] = [
    ("amqp", "redis"),  # RabbitMQ for tasks, Redis for results: a common production pairing
]


def deployments() -> list[tuple[str, str]]:
    """Every (broker, backend) pair the end-to-end scenarios run on."""
    pairs: list[tuple[str, str]] = []
    for name, harness in HARNESSES.items():
        if harness.broker and harness.backend:
            pair = (name, name)
        elif harness.broker:
            pair = (name, harness.companion)
        else:
            pair = (harness.companion, name)
        if pair not in pairs:  # a broker-only and a backend-only driver that pair with each other
            pairs.append(pair)
    pairs += [pair for pair in EXTRA_DEPLOYMENTS if pair not in pairs]
    return pairs


#: (broker, backend) pairs to run, as names of ``HARNESSES``.
DEPLOYMENTS: list[tuple[str, str]] = deployments()

__all__ = ["DEPLOYMENTS", "EXTRA_DEPLOYMENTS", "HARNESSES", "Harness", "deployments"]
