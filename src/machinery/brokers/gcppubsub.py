"""The Google Cloud Pub/Sub broker: Go Machinery's topics and message data, at-least-once.

Kept as Go has it (docs/wire.md §17.2): ``gcppubsub://PROJECT/SUBSCRIPTION``, the topic is the
routing key (default: the default queue), the message data is the Signature JSON with no
attributes. What differs:

- Topics and subscriptions are created when missing (``GCPPubSubConfig(create_missing=False)``
  to refuse instead, as Go does). The default queue is consumed through the URL's
  subscription; another queue ``Q`` through the subscription ``<SUBSCRIPTION>-Q`` on topic ``Q``.
- Messages are pulled (never more than the worker can start), their ack deadline extended
  while the task runs, and acked only after the final state is written; a requeue or a
  shutdown nacks (deadline 0) so another worker gets them. Go's ack-after-nack bug is not
  copied: an undecodable message is not run, it goes to the topic ``<queue>-dead`` (with the
  reason in an attribute) and is acked.
- ETA: published at once, with its ETA in the data; a message pulled before its ETA is given
  back with an ack deadline reaching to the ETA, in hops of at most 600 s (Pub/Sub's limit).
  Go publishers instead wait until the ETA before publishing, and Go workers run messages at
  once, so a Go worker on the same subscription runs our ETA tasks early.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from google.api_core import exceptions as google

from .. import log
from .._drivers.gcp import PubSubClients
from ..config import Config
from ..errors import ConfigError, MessageDecodeError, UnsupportedOperation
from ..signature import Signature
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

#: Pub/Sub's longest ack deadline, and how many messages one acknowledge call takes.
MAX_DEADLINE = 600
ACK_BATCH = 1000
PEEK_DEADLINE = 30


def dead_topic(queue: str) -> str:
    return f"{queue}-dead"


class GCPPubSubBroker(Broker):
    """Go Machinery's Pub/Sub topics, with pulled messages held only while a worker runs them."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        project, _, subscription = config.broker_urls()[0][len("gcppubsub://") :].partition("/")
        self.project = project
        self.subscription_name = subscription
        self.clients = PubSubClients(project, config.gcppubsub.endpoint)
        self._topics: set[str] = set()
        self._subscriptions: set[str] = set()

    # ------------------------------------------------------------------ topology

    def subscription_for(self, queue: str) -> str:
        """The subscription serving ``queue``: the URL's for the default queue."""
        if queue == self.config.default_queue:
            return self.subscription_name
        return f"{self.subscription_name}-{queue}"

    async def ensure_topic(self, topic: str) -> str:
        path = self.clients.topic(topic)
        if topic in self._topics:
            return path
        async with self.clients.call(f"looking up Pub/Sub topic {topic!r}") as (publisher, _):
            try:
                await publisher.get_topic(topic=path)
            except google.NotFound:
                if not self.config.gcppubsub.create_missing:
                    raise ConfigError(
                        f"Pub/Sub topic {path} does not exist: create it, or set GCPPubSubConfig(create_missing=True)"
                    ) from None
                try:
                    await publisher.create_topic(name=path)
                    log.logger.info("Created Pub/Sub topic %s", path)
                except google.AlreadyExists:
                    pass
        self._topics.add(topic)
        return path

    async def ensure_subscription(self, queue: str, name: str | None = None) -> str:
        """The path of the subscription serving ``queue`` (topic and subscription made if allowed)."""
        name = name or self.subscription_for(queue)
        path = self.clients.subscription(name)
        if name in self._subscriptions:
            return path
        topic = await self.ensure_topic(queue)
        async with self.clients.call(f"looking up Pub/Sub subscription {name!r}") as (_, subscriber):
            try:
                await subscriber.get_subscription(subscription=path)
            except google.NotFound:
                if not self.config.gcppubsub.create_missing:
                    raise ConfigError(
                        f"Pub/Sub subscription {path} does not exist: create it on topic {topic}, or set "
                        "GCPPubSubConfig(create_missing=True)"
                    ) from None
                try:
                    await subscriber.create_subscription(
                        name=path, topic=topic, ack_deadline_seconds=self.config.gcppubsub.ack_deadline
                    )
                    log.logger.info("Created Pub/Sub subscription %s on %s", path, topic)
                except google.AlreadyExists:
                    pass
        self._subscriptions.add(name)
        return path

    # ------------------------------------------------------------------ publishing

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        by_topic: dict[str, list[bytes]] = {}
        for queue, body in messages:
            by_topic.setdefault(queue, []).append(body)
        await asyncio.gather(*(self._publish(queue, bodies) for queue, bodies in by_topic.items()))

    async def _publish(self, queue: str, bodies: list[bytes], attributes: dict[str, str] | None = None) -> None:
        if not all(bodies):  # Pub/Sub's answer would be a bare INVALID_ARGUMENT for the whole batch
            raise UnsupportedOperation(
                f"Pub/Sub cannot carry an empty message body (for {queue!r}): a message needs data or attributes"
            )
        # The default queue's subscription must exist before publishing, or Pub/Sub drops the messages.
        if queue == self.config.default_queue or self.config.gcppubsub.create_missing:
            await self.ensure_subscription(queue)
        topic = await self.ensure_topic(queue)
        async with self.clients.call(f"publishing to Pub/Sub topic {queue!r}") as (publisher, _):
            for start in range(0, len(bodies), ACK_BATCH):
                chunk = bodies[start : start + ACK_BATCH]
                await publisher.publish(
                    topic=topic, messages=[{"data": b, "attributes": attributes or {}} for b in chunk]
                )

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        # The ETA travels in the message; consumers hold early messages back (see the module doc).
        await self._push([(s.routing_key, body) for s, body in messages])

    # ------------------------------------------------------------------ consuming

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        consumer = PubSubConsumer(self, queue, await self.ensure_subscription(queue))
        consumer.start()
        return consumer

    # ------------------------------------------------------------------ inspection

    async def _peek(self, queue: str, subscription: str) -> list[Any]:
        """Every message waiting in ``subscription``: each pulled once, then nacked (Pub/Sub has
        no peek; each look counts as a delivery attempt)."""
        seen: dict[str, Any] = {}
        ack_ids: list[str] = []
        async with self.clients.call(f"listing Pub/Sub subscription for {queue!r}") as (_, subscriber):
            try:
                while True:
                    received = await _pull(subscriber, subscription, 1000, 2.0)
                    ack_ids += [m.ack_id for m in received]
                    fresh = [m for m in received if m.message.message_id not in seen]
                    if not fresh:
                        break
                    for m in fresh:
                        seen[m.message.message_id] = m
            finally:
                await _modify(subscriber, subscription, ack_ids, 0)
        return sorted(seen.values(), key=lambda m: m.message.publish_time)

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        name = queue or self.config.default_queue
        found = await self._peek(name, await self.ensure_subscription(name))
        return decode_all(bytes(m.message.data) for m in found)

    async def get_delayed_tasks(self) -> list[Signature]:
        raise UnsupportedOperation(
            "Pub/Sub cannot list delayed messages: a message waiting for its ETA is held back by its ack "
            "deadline and cannot be read until it is delivered again"
        )

    async def _dead_subscription(self, queue: str) -> str:
        return await self.ensure_subscription(dead_topic(queue), dead_topic(self.subscription_for(queue)))

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        name = queue or self.config.default_queue
        letters = []
        for m in await self._peek(name, await self._dead_subscription(name)):
            attributes = dict(m.message.attributes)
            moment = attributes.get("time")
            when = datetime.fromisoformat(moment) if moment else m.message.publish_time
            letters.append(DeadLetter(name, attributes.get("reason", ""), when, bytes(m.message.data)))
        return letters

    async def requeue_dead(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        subscription = await self._dead_subscription(name)
        moved = 0
        async with self.clients.call(f"requeueing the dead letters of {name!r}") as (_, subscriber):
            while True:
                received = await _pull(subscriber, subscription, 1000, 2.0)
                if not received:
                    return moved
                await self._publish(name, [bytes(m.message.data) for m in received])
                await _ack(subscriber, subscription, [m.ack_id for m in received])
                moved += len(received)

    async def delete_queue(self, queue: str) -> None:
        async with self.clients.call(f"deleting Pub/Sub topic {queue!r}") as (publisher, subscriber):
            for subscription in (self.subscription_for(queue), dead_topic(self.subscription_for(queue))):
                with contextlib.suppress(google.NotFound):
                    await subscriber.delete_subscription(subscription=self.clients.subscription(subscription))
                self._subscriptions.discard(subscription)
            for topic in (queue, dead_topic(queue)):
                with contextlib.suppress(google.NotFound):
                    await publisher.delete_topic(topic=self.clients.topic(topic))
                self._topics.discard(topic)

    async def close(self) -> None:
        await self.clients.close()

    async def close_loop_connections(self) -> None:
        await self.clients.close()


class PubSubConsumer(Consumer):
    """One worker's pulls from one subscription, with a lease keeping its messages held."""

    def __init__(self, broker: GCPPubSubBroker, queue: str, subscription: str) -> None:
        self.broker = broker
        self.queue = queue
        self.subscription = subscription
        self.deadline = broker.config.gcppubsub.ack_deadline
        #: Ack IDs taken and not yet settled -> when they were taken (for the max extension).
        self.held: dict[str, float] = {}
        self._lease: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._lease = asyncio.ensure_future(self._keep_leased())

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        wait = 1.0 if timeout is None else timeout
        async with self.broker.clients.call(f"pulling from Pub/Sub for {self.queue!r}") as (_, subscriber):
            received = await _pull(subscriber, self.subscription, max(1, max_count), wait)
            deliveries, early = [], []
            for m in received:
                body = bytes(m.message.data)
                left = _seconds_to_eta(body)
                if left > 0:  # never run early: a fraction of a second left is one more (short) delay
                    early.append((m.ack_id, left))
                    continue
                self.held[m.ack_id] = time.monotonic()
                deliveries.append(Delivery(body, self.queue, m.ack_id))
            for ack_id, left in early:  # back when due, or at the next hop of a long delay
                await _modify(subscriber, self.subscription, [ack_id], min(MAX_DEADLINE, math.ceil(left)))
        return deliveries

    async def ack(self, delivery: Delivery) -> None:
        async with self.broker.clients.call(f"acknowledging a message of {self.queue!r}") as (_, subscriber):
            await _ack(subscriber, self.subscription, [delivery.receipt])
        self.held.pop(delivery.receipt, None)

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        async with self.broker.clients.call(f"returning a message to {self.queue!r}") as (_, subscriber):
            await _modify(subscriber, self.subscription, [delivery.receipt], min(MAX_DEADLINE, math.ceil(delay)))
        self.held.pop(delivery.receipt, None)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        broker = self.broker
        await broker._dead_subscription(self.queue)  # so that the dead letter is kept
        attributes = {"reason": reason[:1000], "time": datetime.now(timezone.utc).isoformat(), "queue": self.queue}
        await broker._publish(dead_topic(self.queue), [delivery.body], attributes)
        await self.ack(delivery)

    async def close(self) -> None:
        self.abandon()
        if self.held:
            ack_ids, self.held = list(self.held), {}
            try:
                async with self.broker.clients.call(f"returning messages to {self.queue!r}") as (_, subscriber):
                    await _modify(subscriber, self.subscription, ack_ids, 0)
            except Exception as exc:  # they come back when their deadline lapses anyway
                log.logger.debug("nacking on close failed: %s", exc)
            log.logger.info("Returned %d unfinished message(s) to %r", len(ack_ids), self.queue)

    def abandon(self) -> None:
        """Stop extending deadlines, as a dead worker would (the messages come back by themselves)."""
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None

    async def _keep_leased(self) -> None:
        limit = self.broker.config.gcppubsub.max_extension
        while True:
            await asyncio.sleep(max(1.0, self.deadline / 3))
            now = time.monotonic()
            ack_ids = [a for a, since in self.held.items() if now - since < limit]
            if not ack_ids:
                continue
            try:
                async with self.broker.clients.call(f"extending deadlines on {self.queue!r}") as (_, subscriber):
                    await _modify(subscriber, self.subscription, ack_ids, self.deadline)
            except Exception as exc:  # the next round tries again
                log.logger.debug("ack deadline extension failed: %s", exc)


# ---------------------------------------------------------------------- helpers


async def _pull(subscriber: Any, subscription: str, count: int, wait: float) -> list[Any]:
    """Pull up to ``count`` messages, waiting up to ``wait`` seconds for the first."""
    try:
        response = await subscriber.pull(
            subscription=subscription, max_messages=count, timeout=max(0.5, wait), retry=None
        )
    except google.DeadlineExceeded:
        return []
    return list(response.received_messages)


async def _ack(subscriber: Any, subscription: str, ack_ids: Sequence[str]) -> None:
    for start in range(0, len(ack_ids), ACK_BATCH):
        await subscriber.acknowledge(subscription=subscription, ack_ids=list(ack_ids[start : start + ACK_BATCH]))


async def _modify(subscriber: Any, subscription: str, ack_ids: Sequence[str], seconds: int) -> None:
    for start in range(0, len(ack_ids), ACK_BATCH):
        chunk = list(ack_ids[start : start + ACK_BATCH])
        await subscriber.modify_ack_deadline(subscription=subscription, ack_ids=chunk, ack_deadline_seconds=seconds)


def _seconds_to_eta(body: bytes) -> float:
    try:
        eta = Signature.decode(body).eta
    except MessageDecodeError:
        return 0.0
    return 0.0 if eta is None else (eta - datetime.now(timezone.utc)).total_seconds()


__all__ = ["GCPPubSubBroker", "PubSubConsumer", "dead_topic"]
