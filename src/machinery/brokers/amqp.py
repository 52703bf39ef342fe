"""The RabbitMQ broker (aio-pika), with Go Machinery's topology and message properties.

Topology (docs/wire.md §10.1), declared on every new connection:

* the exchange (``amqp.exchange``, type ``amqp.exchange_type``): durable, not auto-delete,
  no arguments; nothing is declared when the name is empty (the default exchange);
* a worker's queue: durable, not auto-delete, not exclusive, arguments
  ``amqp.queue_declare_args``, bound with ``amqp.binding_key`` (and ``queue_binding_args``),
  consumed with ``basic.qos(prefetch)`` and manual acks;
* the publisher's queue. For a ``direct`` exchange Go declares a durable queue **named after
  the routing key** and binds it with that key; otherwise it declares the default queue
  bound with the binding key.

The Go quirk this reproduces, on purpose and by default: with the default configuration
(routing key ``machinery_task``, worker queue ``machinery_tasks``) every publisher declares
a queue ``machinery_task`` that no worker reads, so every task is also copied there and
piles up, and a task published before any worker has declared ``machinery_tasks`` only
reaches ``machinery_task``. Mixed Go/Python deployments need the same declarations on both
sides (a Go worker expects to find that queue). A Python-only deployment can set
``amqp.skip_publisher_queue`` (``AMQP_SKIP_PUBLISHER_QUEUE``): a task whose routing key is the
binding key then makes the publisher declare the workers' queue (``default_queue`` bound
with the binding key) instead, so nothing piles up and early tasks wait for the first
worker. Routing keys naming another queue are declared as Go does in both modes, since that
queue is the destination of custom-queue workers.

Messages (docs/wire.md §10.2): persistent, ``application/json``, ``priority`` only when non-zero,
AMQP ``headers`` = ``Signature.headers`` only when non-empty; body = the Signature JSON.
(aiormq also stamps a random ``message_id`` on every publish, to pair returned messages with
their confirms; Go ignores it.) Every publish waits for the broker's confirm; a nack, or the
connection dying first, raises to the caller.

Delayed tasks (docs/wire.md §10.3) go through ``delay.<ms>.<exchange>.<routing key>`` queues whose
messages expire into the exchange (dead-lettering) with the original routing key; with
``amqp.delayed_queue`` set, through that one queue with a per-message expiration instead.

At-least-once: a consumer acks only when the worker says so (after the final state is written
and callbacks are published). A worker that dies, or whose connection drops, leaves its
messages unacked and RabbitMQ delivers them again; settling a delivery that came over a dead
channel is a no-op. Messages that cannot be decoded are copied to ``<queue>.dead`` (durable,
reached through the default exchange) with the reason and time in their headers, and then
acked, where Go drops them.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import DeliveredMessage

from .. import log
from .._drivers.amqp import (
    AMQP_ERRORS,
    SETTLE_TIMEOUT,
    AMQPConnector,
    AMQPInt64,
    Session,
    amqp_errors,
    bounded,
    count_queue,
    gather_all,
    give_back,
    is_dead,
    message,
    on_close,
    peek_queue,
    quietly,
    settle,
)
from ..config import Config
from ..errors import UnsupportedOperation
from ..signature import Signature
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

#: How long a fetch waits for a delivery when the worker leaves it to the broker (deliveries
#: wake it at once, so this only bounds one call).
POLL_SECONDS = 1.0

#: Headers put on dead letters (the original message's headers are kept beside them).
REASON_HEADER = "x-machinery-reason"
TIME_HEADER = "x-machinery-dead-lettered-at"
QUEUE_HEADER = "x-machinery-queue"


def dead_letter_queue(queue: str) -> str:
    """Where undecodable messages of ``queue`` go."""
    return f"{queue}.dead"


class AMQPBroker(Broker):
    """Publishes to and consumes from RabbitMQ, laid out exactly as Go Machinery does."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._connector = AMQPConnector(config.broker_urls(), role="broker")
        self._warned_prefetch = False

    # ------------------------------------------------------------------ topology helpers

    @property
    def _direct(self) -> bool:
        return self.config.amqp.exchange_type.lower() == "direct"

    def routing_key_for(self, signature: Signature) -> str:
        """Go's ``AdjustRoutingKey``: the binding key for a direct exchange, else the default queue."""
        return self.config.amqp.binding_key if self._direct else self.config.default_queue

    def publisher_queue(self, routing_key: str) -> tuple[str, str]:
        """The (queue, binding key) a publisher declares before publishing with ``routing_key``."""
        amqp = self.config.amqp
        if not self._direct:
            return self.config.default_queue, amqp.binding_key
        if amqp.skip_publisher_queue and routing_key == amqp.binding_key:
            return self.config.default_queue, amqp.binding_key
        return routing_key, routing_key

    async def _declare_task_queue(self, session: Session, queue: str, binding_key: str) -> int:
        amqp = self.config.amqp
        return await session.queue(
            queue,
            durable=True,
            auto_delete=False,
            arguments=amqp.queue_declare_args,
            exchange=amqp.exchange,
            exchange_type=amqp.exchange_type,
            binding_key=binding_key,
            binding_arguments=amqp.queue_binding_args,
        )

    # ------------------------------------------------------------------ publishing

    async def publish_many(self, signatures: Iterable[Signature]) -> None:
        """Publish every signature (delayed ones through delay queues), confirms awaited together.

        Raises the first error once every publish has finished or failed; messages whose
        confirm arrived are in RabbitMQ either way.
        """
        now = datetime.now(timezone.utc)
        jobs = []
        for signature in signatures:
            if not signature.routing_key:
                signature.routing_key = self.routing_key_for(signature)
            jobs.append(self._publish_signature(signature, signature.encode(), now))
        await gather_all(jobs)

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        await gather_all([self._publish_now(queue, body, 0, None) for queue, body in messages])

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        now = datetime.now(timezone.utc)
        await gather_all([self._publish_signature(signature, body, now) for signature, body in messages])

    def _publish_signature(self, signature: Signature, body: bytes, now: datetime) -> Coroutine[Any, Any, None]:
        """The publish of ``body``: through a delay queue while the signature's ETA is ahead of ``now``."""
        delay_ms = 0
        if signature.eta is not None and signature.eta > now:
            delay_ms = math.floor((signature.eta - now).total_seconds() * 1000)
        if delay_ms > 0:
            return self._publish_delayed(signature.routing_key, body, delay_ms, signature.headers)
        return self._publish_now(signature.routing_key, body, signature.priority, signature.headers)

    async def _publish_now(self, routing_key: str, body: bytes, priority: int, headers: dict[str, Any] | None) -> None:
        amqp = self.config.amqp
        session = await self._connector.session()
        with amqp_errors(f"declaring the queue for routing key {routing_key!r}"):
            await self._declare_task_queue(session, *self.publisher_queue(routing_key))
        await session.publish(
            amqp.exchange,
            routing_key,
            message(body, priority=priority, headers=headers),
            exchange_type=amqp.exchange_type,
        )

    async def _publish_delayed(
        self, routing_key: str, body: bytes, delay_ms: int, headers: dict[str, Any] | None
    ) -> None:
        """docs/wire.md §10.3: park the message in a queue whose expiry dead-letters it to the exchange."""
        amqp = self.config.amqp
        session = await self._connector.session()
        dead_letter_args: dict[str, Any] = {
            "x-dead-letter-exchange": amqp.exchange,
            "x-dead-letter-routing-key": routing_key,
        }
        if amqp.delayed_queue:
            queue, expiration, arguments = amqp.delayed_queue, delay_ms, dead_letter_args
        else:
            queue, expiration = f"delay.{delay_ms}.{amqp.exchange}.{routing_key}", None
            arguments = {
                **dead_letter_args,
                "x-message-ttl": AMQPInt64(delay_ms),
                "x-expires": AMQPInt64(delay_ms * 2),
            }
        with amqp_errors(f"declaring delay queue {queue!r}"):
            await session.queue(
                queue,
                durable=True,
                auto_delete=amqp.auto_delete,
                arguments=arguments,
                exchange=amqp.exchange,
                exchange_type=amqp.exchange_type,
                binding_key=queue,
                # A delay queue lives 2 x its delay: declare it again for every message, as Go
                # does, so that a queue that has expired since is created anew.
                cache=bool(amqp.delayed_queue),
            )
        # Go leaves priority out of delayed messages (docs/wire.md §10.3). Mandatory, unlike Go: a
        # delay queue of a few ms can expire between its declaration and the publish, and
        # then the message would be dropped unseen; it is due by then, so it goes out now.
        if not await session.publish(
            amqp.exchange,
            queue,
            message(body, headers=headers, expiration_ms=expiration),
            exchange_type=amqp.exchange_type,
            mandatory=True,
        ):
            log.logger.debug("delay queue %s vanished before the publish; publishing now", queue)
            await self._publish_now(routing_key, body, 0, headers)

    # ------------------------------------------------------------------ consuming

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        """Consume ``queue`` with at most ``prefetch`` unacked messages.

        The limit is the worker's concurrency, lowered further by ``amqp.prefetch_count`` when
        that is set (> 0): RabbitMQ never hands this worker more than it can run.
        """
        limit = self.config.amqp.prefetch_count
        if prefetch is not None and prefetch > 0:
            if 0 < limit < prefetch and not self._warned_prefetch:
                self._warned_prefetch = True  # once, not at every reconnect
                log.logger.warning(
                    "amqp.prefetch_count=%d lets this worker run only %d of its %d concurrent tasks "
                    "(as in Go); raise it (AMQP_PREFETCH_COUNT) or set it to 0 to follow the concurrency",
                    limit,
                    limit,
                    prefetch,
                )
            limit = min(limit, prefetch) if limit > 0 else prefetch
        consumer = AMQPConsumer(self, queue, consumer_tag, limit)
        await consumer.start()
        return consumer

    # ------------------------------------------------------------------ inspection

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        """The messages ready in ``queue``, oldest first, without taking them away.

        As Go does: take every ready message with ``basic.get`` on a channel of its own
        without acking, then ``basic.nack(multiple, requeue)``, which puts them back at their
        original positions, so delivery order is unchanged. While they are held a running
        consumer may be handed the messages behind them.
        """
        name = queue or self.config.default_queue
        taken = await self._peek(name, f"inspecting queue {name!r}")
        return decode_all([incoming.body for incoming in taken])

    async def get_delayed_tasks(self) -> list[Signature]:
        """Not available on RabbitMQ: raises ``UnsupportedOperation`` (Go returns nothing).

        Delayed tasks sit in one queue per delay (``delay.<ms>.<exchange>.<routing key>``),
        and AMQP has no way to list queues (only the management plugin's HTTP API has), so
        they cannot be found; ``rabbitmqctl list_queues name messages`` shows them.
        """
        raise UnsupportedOperation(
            "RabbitMQ keeps delayed tasks in one queue per delay (delay.<ms>.<exchange>.<routing key>), "
            "which AMQP cannot list; see them with: rabbitmqctl list_queues name messages"
        )

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The dead letters of ``queue`` (default queue if None), oldest first, left in place."""
        name = queue or self.config.default_queue
        taken = await self._peek(dead_letter_queue(name), f"inspecting {dead_letter_queue(name)!r}")
        return [_dead_letter_from(incoming, name) for incoming in taken]

    async def _peek(self, name: str, what: str) -> list[AbstractIncomingMessage]:
        """The messages in queue ``name``, oldest first, left in place (``what`` names the
        operation in errors)."""
        session = await self._connector.session()
        async with session.side_channel() as channel:
            with amqp_errors(what):
                taken = await peek_queue(channel, name)
                await give_back(taken)
        return taken

    async def requeue_dead(self, queue: str | None = None) -> int:
        """Move the dead letters of ``queue`` back onto it (oldest first); returns how many.

        Each is published straight to the queue (default exchange) with a confirm before its
        dead-letter copy is acked, so a crash in between duplicates rather than loses it.
        """
        name = queue or self.config.default_queue
        session = await self._connector.session()
        moved = 0
        async with session.side_channel() as channel:
            with amqp_errors(f"requeueing {dead_letter_queue(name)!r}"):
                for incoming in await peek_queue(channel, dead_letter_queue(name)):
                    headers = {
                        k: v
                        for k, v in (incoming.headers or {}).items()
                        if k not in (REASON_HEADER, TIME_HEADER, QUEUE_HEADER)
                    }
                    await session.publish(
                        "",
                        name,
                        message(
                            incoming.body,
                            priority=incoming.priority or 0,
                            headers=headers,
                            content_type=incoming.content_type,
                        ),
                    )
                    await bounded(incoming.ack())
                    moved += 1
        return moved

    async def queue_depth(self, queue: str | None = None) -> int:
        """The queue's ready count as RabbitMQ reports it (a passive ``queue.declare``)."""
        return await self._count(queue or self.config.default_queue, False)

    async def dead_count(self, queue: str | None = None) -> int:
        return await self._count(dead_letter_queue(queue or self.config.default_queue), False)

    async def purge(self, queue: str | None = None) -> int:
        """``queue.purge``: the ready messages go; those delivered to a consumer and not yet
        acked stay (RabbitMQ's own rule, the same as the other brokers')."""
        return await self._count(queue or self.config.default_queue, True)

    async def purge_dead(self, queue: str | None = None) -> int:
        return await self._count(dead_letter_queue(queue or self.config.default_queue), True)

    async def _count(self, name: str, purge: bool) -> int:
        session = await self._connector.session()
        async with session.side_channel() as channel:
            with amqp_errors(f"{'purging' if purge else 'counting'} queue {name!r}"):
                return await count_queue(channel, name, purge)

    async def ping(self) -> None:
        """Open (or reuse) the publishing connection and a channel on it."""
        session = await self._connector.session(attempts=1)
        async with session.side_channel():
            pass

    async def delete_queue(self, queue: str) -> None:
        """Delete the queue (and so its bindings and waiting messages) and ``<queue>.dead``."""
        session = await self._connector.session()
        async with session.side_channel() as channel:
            with amqp_errors(f"deleting queue {queue!r}"):
                underlay = await channel.get_underlay_channel()
                for name in (queue, dead_letter_queue(queue)):
                    await underlay.queue_delete(name)
        session.forget(queue)

    async def close(self) -> None:
        """Close this loop's publishing connection (other loops' close when their loop ends)."""
        await self.close_loop_connections()

    async def close_loop_connections(self) -> None:
        await self._connector.close()

    # ------------------------------------------------------------------ consumer support

    async def _dead_letter(self, queue: str, delivered: DeliveredMessage, reason: str) -> None:
        session = await self._connector.session()
        target = dead_letter_queue(queue)
        with amqp_errors(f"declaring {target!r}"):
            await session.queue(target, durable=True, auto_delete=False, arguments=None)
        properties = delivered.header.properties
        headers = dict(properties.headers or {})
        headers.update(
            {
                REASON_HEADER: reason,
                TIME_HEADER: datetime.now(timezone.utc).isoformat(),
                QUEUE_HEADER: queue,
            }
        )
        await session.publish(
            "", target, message(delivered.body, headers=headers, content_type=properties.content_type)
        )


def _dead_letter_from(incoming: AbstractIncomingMessage, queue: str) -> DeadLetter:
    headers = incoming.headers or {}
    when = headers.get(TIME_HEADER)
    try:
        moment = datetime.fromisoformat(str(when)) if when else datetime.now(timezone.utc)
    except ValueError:
        moment = datetime.now(timezone.utc)
    return DeadLetter(
        queue=str(headers.get(QUEUE_HEADER) or queue),
        reason=str(headers.get(REASON_HEADER) or ""),
        time=moment,
        body=incoming.body,
    )


class AMQPConsumer(Consumer):
    """One worker's consumer: its own connection, ``basic.qos(prefetch)``, manual acks.

    Deliveries are buffered as RabbitMQ pushes them (never more than ``prefetch``, all
    unacked) and handed out by ``fetch``. When the channel or connection dies, the buffer is
    dropped (RabbitMQ redelivers those messages) and the next ``fetch`` reconnects, declares
    the topology again and resumes consuming; if that fails it raises, and the worker
    retries after its Fibonacci backoff.
    """

    def __init__(self, broker: AMQPBroker, queue: str, consumer_tag: str, prefetch: int) -> None:
        self.broker = broker
        self.queue = queue
        self.consumer_tag = consumer_tag
        self.prefetch = prefetch
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._buffer: deque[DeliveredMessage] = deque()
        self._arrived = asyncio.Event()
        self._broken = True
        self._closed = False
        self._generation = 0

    # ------------------------------------------------------------------ connection

    async def start(self) -> None:
        """Connect, declare the worker's topology and start consuming (raises on failure)."""
        config = self.broker.config
        amqp = config.amqp
        connection = await self.broker._connector.open_connection("consumer")
        try:
            with amqp_errors(f"starting to consume {self.queue!r}"):
                channel = await connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.prefetch)
                if amqp.exchange:
                    await channel.declare_exchange(amqp.exchange, amqp.exchange_type, durable=True, auto_delete=False)
                queue = await channel.declare_queue(
                    self.queue, durable=True, auto_delete=False, arguments=amqp.queue_declare_args or None
                )
                if amqp.exchange:
                    await queue.bind(amqp.exchange, amqp.binding_key, arguments=amqp.queue_binding_args or None)
                self._buffer.clear()
                self._broken = False
                self._generation += 1
                generation = self._generation
                on_close(channel, lambda: self._on_lost(generation))
                underlay = await channel.get_underlay_channel()
                underlay.on_consumer_cancel_callbacks.add(lambda _frame: self._on_lost(generation))
                # aiormq directly: one task per delivery instead of aio-pika's two, and the
                # delivery keeps its channel, so settling it on a dead channel is detectable.
                await underlay.basic_consume(
                    queue.name,
                    functools.partial(self._on_message, generation),
                    no_ack=False,
                    consumer_tag=self.consumer_tag,
                )
        except BaseException:
            self._broken = True
            await quietly(connection.close())
            raise
        self._connection, self._channel, self._amqp_queue = connection, channel, queue
        log.logger.debug("consuming %r with prefetch %d", self.queue, self.prefetch)

    async def _on_message(self, generation: int, incoming: DeliveredMessage) -> None:
        if generation != self._generation:
            return  # late delivery from a channel already replaced: it is redelivered anyway
        self._buffer.append(incoming)
        self._arrived.set()

    def _on_lost(self, generation: int) -> None:
        """The channel died, or RabbitMQ cancelled the consumer (its queue was deleted)."""
        if generation != self._generation:
            return
        if not self._broken and not self._closed:
            log.logger.warning(
                "Lost the RabbitMQ channel consuming %r; reconnecting (unacked messages are redelivered)", self.queue
            )
        self._broken = True
        self._arrived.set()

    async def _reconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._amqp_queue = None
        self._buffer.clear()  # those deliveries died with their channel; RabbitMQ redelivers them
        if connection is not None:
            await quietly(connection.close())
        await self.start()
        log.logger.info("Consuming %r again after reconnecting to RabbitMQ", self.queue)

    # ------------------------------------------------------------------ the Consumer seam

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        if self._closed:
            return []
        if self._broken or is_dead(self._connection):
            await self._reconnect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (POLL_SECONDS if timeout is None else timeout)
        while not self._buffer:
            if self._broken:
                return []  # the next fetch reconnects
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return []
        taken: list[Delivery] = []
        while self._buffer and len(taken) < max_count:
            incoming = self._buffer.popleft()
            taken.append(Delivery(incoming.body, self.queue, incoming))
        return taken

    async def ack(self, delivery: Delivery) -> None:
        await self._settle(delivery, "ack")

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Back to the queue now (``basic.nack`` requeue), or later through Go's delay queues:
        the message is republished there (confirmed) before the delivery is acked."""
        delay_ms = math.floor(delay * 1000)
        if delay_ms <= 0:
            await self._settle(delivery, "requeue")
            return
        delivered: DeliveredMessage = delivery.receipt
        routing_key = delivered.routing_key or self.queue
        headers = dict(delivered.header.properties.headers or {})
        await self.broker._publish_delayed(routing_key, delivery.body, delay_ms, headers or None)
        await self._settle(delivery, "ack")

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy the message to ``<queue>.dead`` with ``reason`` (confirmed), then ack it."""
        await self.broker._dead_letter(self.queue, delivery.receipt, reason)
        await self._settle(delivery, "ack")

    async def _settle(self, delivery: Delivery, how: str) -> None:
        # On a dead channel this is a no-op: RabbitMQ has already put the message back and
        # will deliver it again. Nothing to do, nothing lost.
        await settle(delivery.receipt, ack=how == "ack")

    async def close(self) -> None:
        """Stop consuming and give every unsettled message back (``basic.nack`` requeue)."""
        self._closed = True
        channel, queue, connection = self._channel, self._amqp_queue, self._connection
        self._channel = self._amqp_queue = self._connection = None
        self._buffer.clear()
        if channel is not None and queue is not None and not channel.is_closed:
            try:
                await asyncio.wait_for(self._give_back(channel, queue), SETTLE_TIMEOUT)
            except AMQP_ERRORS as exc:  # asyncio.TimeoutError included
                log.logger.debug("closing the consumer of %r: %s (RabbitMQ requeues on disconnect)", self.queue, exc)
        if connection is not None:
            await quietly(connection.close())

    async def _give_back(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        await queue.cancel(self.consumer_tag)
        underlay = await channel.get_underlay_channel()
        # Tag 0 with multiple=True covers every delivery still unacked on this channel.
        await underlay.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        await channel.close()
