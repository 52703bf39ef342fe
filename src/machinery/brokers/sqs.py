"""The Amazon SQS broker: Go Machinery's queues and message bodies, with at-least-once on top.

Kept as Go has it (docs/wire.md §17.1): queue URL = broker URL + "/" + queue name, message body
= the Signature JSON and nothing else, ``.fifo`` queues take ``BrokerMessageGroupId`` as the
group, so Go and Python clients and workers share a queue. Added beside it:

- A message is deleted only when the worker acks it (after its final state is written). While
  it is held, the consumer extends its visibility every third of the visibility timeout, so a
  long task is not handed to another worker; a worker that dies stops extending and SQS gives
  the message to another by itself.
- ETA: ``DelaySeconds`` up to ``SQSConfig.max_delay_seconds`` (SQS allows 15 minutes). A
  message that arrives before its ETA is sent again with the next hop's delay and the old one
  deleted, until it is due (on a FIFO queue, which has no per-message delay, it is hidden
  with ChangeMessageVisibility instead).
- Undecodable messages go to ``<queue>-dead`` (``<name>-dead.fifo``), reason in a message
  attribute, never dropped silently.
- FIFO deduplication uses a hash of the body, not the task UUID as Go does: Go's choice
  silently drops a retry (same UUID) sent within five minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError

from .. import log
from .._drivers.aws import AWSClients, endpoint_for, error_code
from ..config import Config, redact_url
from ..errors import ConfigError, UnsupportedOperation
from ..signature import Signature
from ._sqs_messages import (
    BATCH,
    change_visibility,
    delete_messages,
    group_id,
    message_body,
    seconds_to_eta,
    single_entry,
    sqs_text,
)
from .base import Broker, Consumer, DeadLetter, Delivery, decode_all

#: SQS's limits: seconds of long polling, seconds of visibility.
MAX_WAIT = 20
MAX_VISIBILITY = 43_200
#: Seconds acks wait for others to share their DeleteMessageBatch.
ACK_GATHER = 0.02
_MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_REASON = "MachineryDeadReason"
_DEAD_TIME = "MachineryDeadTime"
_FROM_QUEUE = "MachineryDeadQueue"


def is_fifo(queue: str) -> bool:
    return queue.endswith(".fifo")


def dead_queue_name(queue: str) -> str:
    """``<queue>-dead``, keeping a FIFO queue's ``.fifo`` suffix last."""
    return f"{queue[:-5]}-dead.fifo" if is_fifo(queue) else f"{queue}-dead"


class SQSBroker(Broker):
    """Go Machinery's SQS queues, with visibility heartbeats, ETA hops and dead letters."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        base = config.broker_urls()[0].rstrip("/")
        self.base = base
        sqs = config.sqs
        self.clients = AWSClients("sqs", "SQS", base, endpoint_for("SQS", sqs.endpoint_url, base), sqs.region)
        self._known: set[str] = set()

    # ------------------------------------------------------------------ queues

    def queue_url(self, queue: str) -> str:
        """Go's rule: the broker URL, a slash, the queue name."""
        return f"{self.base}/{queue}"

    async def ensure_queue(self, queue: str) -> str:
        """The queue's URL after checking it exists (creating it if configured to)."""
        url = self.queue_url(queue)
        if queue in self._known:
            return url
        async with self.clients.call(f"looking up SQS queue {queue!r}") as sqs:
            try:
                await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            except ClientError as exc:
                if error_code(exc) not in _MISSING_QUEUE:
                    raise
                if not self.config.sqs.create_missing and not queue.endswith(("-dead", "-dead.fifo")):
                    raise ConfigError(
                        f"SQS queue {queue!r} does not exist at {redact_url(url)}: create it, or set "
                        "SQSConfig(create_missing=True)"
                    ) from None
                attributes = {"FifoQueue": "true"} if is_fifo(queue) else {}
                await sqs.create_queue(QueueName=queue, Attributes=attributes)
                log.logger.info("Created SQS queue %r", queue)
        self._known.add(queue)
        return url

    # ------------------------------------------------------------------ publishing

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        await self._send([(queue, body, 0) for queue, body in messages])

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        now = datetime.now(timezone.utc)
        entries = []
        for signature, body in messages:
            assert signature.eta is not None and signature.routing_key
            entries.append((signature.routing_key, body, (signature.eta - now).total_seconds()))
        await self._send(entries)

    async def _send(self, messages: Sequence[tuple[str, bytes, float]]) -> None:
        """Send (queue, body, delay) messages in batches of ten per queue."""
        by_queue: dict[str, list[tuple[bytes, float]]] = defaultdict(list)
        for queue, body, delay in messages:
            by_queue[queue].append((body, delay))
        await asyncio.gather(*(self._send_to(queue, items) for queue, items in by_queue.items()))

    async def _send_to(self, queue: str, items: list[tuple[bytes, float]]) -> None:
        url = await self.ensure_queue(queue)
        entries = [self._entry(queue, str(i), body, delay) for i, (body, delay) in enumerate(items)]
        async with self.clients.call(f"sending to SQS queue {queue!r}") as sqs:
            for start in range(0, len(entries), BATCH):
                chunk = entries[start : start + BATCH]
                if len(chunk) == 1:
                    await sqs.send_message(QueueUrl=url, **single_entry(chunk[0]))
                    continue
                if sum(len(e["MessageBody"]) for e in chunk) > 256 * 1024:  # SQS's limit per batch
                    for entry in chunk:
                        await sqs.send_message(QueueUrl=url, **single_entry(entry))
                    continue
                response = await sqs.send_message_batch(QueueUrl=url, Entries=chunk)
                failed = response.get("Failed") or []
                if failed:
                    reasons = "; ".join(f"{f.get('Code')}: {f.get('Message')}" for f in failed)
                    raise ConfigError(f"SQS refused {len(failed)} message(s) for {queue!r}: {reasons}")

    def _entry(self, queue: str, entry_id: str, body: bytes, delay: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"Id": entry_id, "MessageBody": sqs_text(body, queue)}
        if is_fifo(queue):
            entry["MessageGroupId"] = group_id(body, queue)
            entry["MessageDeduplicationId"] = hashlib.sha256(body).hexdigest()
        elif delay > 0:
            entry["DelaySeconds"] = min(self.config.sqs.max_delay_seconds, math.ceil(delay))
        return entry

    # ------------------------------------------------------------------ consuming

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        consumer = SQSConsumer(self, queue, await self.ensure_queue(queue))
        await consumer.start()
        return consumer

    # ------------------------------------------------------------------ inspection

    async def _peek(self, queue: str) -> list[tuple[str, bytes, dict[str, Any]]]:
        """Every visible message of ``queue``: each is received once with a short visibility, then
        made visible again (SQS has no peek; see the README for what this costs)."""
        url = await self.ensure_queue(queue)
        seen: dict[str, tuple[str, bytes, dict[str, Any]]] = {}
        handles: list[str] = []
        async with self.clients.call(f"listing SQS queue {queue!r}") as sqs:
            try:
                while True:
                    response = await sqs.receive_message(
                        QueueUrl=url,
                        MaxNumberOfMessages=BATCH,
                        WaitTimeSeconds=1,
                        VisibilityTimeout=30,
                        MessageAttributeNames=["All"],
                        AttributeNames=["SentTimestamp"],
                    )
                    messages = response.get("Messages") or []
                    fresh = [m for m in messages if m["MessageId"] not in seen]
                    for m in messages:
                        handles.append(m["ReceiptHandle"])
                    if not fresh:
                        break
                    for m in fresh:
                        seen[m["MessageId"]] = (m["Attributes"].get("SentTimestamp", "0"), message_body(m), m)
            finally:
                await change_visibility(sqs, url, handles, 0)
        return sorted(seen.values(), key=lambda item: int(item[0]))

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        """The visible messages of ``queue``: found by receiving each once (see ``_peek``)."""
        return decode_all(body for _, body, _ in await self._peek(queue or self.config.default_queue))

    async def get_delayed_tasks(self) -> list[Signature]:
        raise UnsupportedOperation(
            "SQS cannot list delayed messages: they are invisible until their delay ends, and receiving "
            "them is the only way to read a message"
        )

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        name = queue or self.config.default_queue
        letters = []
        for sent, body, message in await self._peek(dead_queue_name(name)):
            attributes = message.get("MessageAttributes") or {}
            reason = attributes.get(_REASON, {}).get("StringValue", "")
            when = attributes.get(_DEAD_TIME, {}).get("StringValue")
            moment = datetime.fromisoformat(when) if when else datetime.fromtimestamp(int(sent) / 1000, timezone.utc)
            letters.append(DeadLetter(name, reason, moment, body))
        return letters

    async def requeue_dead(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        return await self._drain(dead_queue_name(name), f"requeueing the dead letters of {name!r}", forward=name)

    async def _drain(self, queue: str, what: str, forward: str | None = None) -> int:
        """Receive every visible message of ``queue`` and delete it, sent to ``forward`` first
        if given; returns how many. Messages in flight or delayed are not visible, so not
        touched (SQS's PurgeQueue would delete those too). 0 for a queue that does not exist."""
        url = self.queue_url(queue)
        drained = 0
        async with self.clients.call(what) as sqs:
            while True:
                try:
                    response = await sqs.receive_message(
                        QueueUrl=url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=1, VisibilityTimeout=60
                    )
                except ClientError as exc:
                    if error_code(exc) not in _MISSING_QUEUE:
                        raise
                    return drained
                messages = response.get("Messages") or []
                if not messages:
                    return drained
                if forward is not None:
                    await self._push([(forward, message_body(m)) for m in messages])
                await delete_messages(sqs, url, [m["ReceiptHandle"] for m in messages])
                drained += len(messages)

    async def delete_queue(self, queue: str) -> None:
        async with self.clients.call(f"deleting SQS queue {queue!r}") as sqs:
            for name in (queue, dead_queue_name(queue)):
                with contextlib.suppress(ClientError):
                    await sqs.delete_queue(QueueUrl=self.queue_url(name))
                self._known.discard(name)

    async def queue_counts(self, queue: str) -> tuple[int, int, int]:
        """SQS's approximate (visible, in flight, delayed) message counts of ``queue``; zeros
        for a queue that does not exist."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        names.append("ApproximateNumberOfMessagesDelayed")
        async with self.clients.call(f"counting SQS queue {queue!r}") as sqs:
            try:
                response = await sqs.get_queue_attributes(QueueUrl=self.queue_url(queue), AttributeNames=names)
            except ClientError as exc:
                if error_code(exc) not in _MISSING_QUEUE:
                    raise
                return 0, 0, 0
        values = response.get("Attributes") or {}
        visible, in_flight, delayed = (int(values.get(n, 0)) for n in names)
        return visible, in_flight, delayed

    # ------------------------------------------------------------------ operations
    # SQS's counts are its own approximations: exact on a quiet queue, and on AWS they catch
    # up within about a minute of a change.

    async def queue_depth(self, queue: str | None = None) -> int:
        """The visible messages of ``queue`` (SQS's approximate count)."""
        return (await self.queue_counts(queue or self.config.default_queue))[0]

    async def delayed_count(self, queue: str | None = None) -> int:
        """The messages of ``queue`` still within their delivery delay (SQS's approximate
        count; an ETA beyond the 15 minutes SQS can delay is counted while it hops)."""
        return (await self.queue_counts(queue or self.config.default_queue))[2]

    async def purge(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        return await self._drain(name, f"purging SQS queue {name!r}")

    async def dead_count(self, queue: str | None = None) -> int:
        return (await self.queue_counts(dead_queue_name(queue or self.config.default_queue)))[0]

    async def purge_dead(self, queue: str | None = None) -> int:
        name = queue or self.config.default_queue
        return await self._drain(dead_queue_name(name), f"purging the dead letters of {name!r}")

    async def ping(self) -> None:
        """One request SQS answers whatever queues exist (ListQueues)."""
        async with self.clients.call("pinging SQS") as sqs:
            await sqs.list_queues(MaxResults=1)

    async def close(self) -> None:
        await self.clients.close()

    async def close_loop_connections(self) -> None:
        await self.clients.close()


class SQSConsumer(Consumer):
    """One worker's receiving on one queue, with a heartbeat that keeps its messages hidden."""

    def __init__(self, broker: SQSBroker, queue: str, url: str) -> None:
        self.broker = broker
        self.queue = queue
        self.url = url
        self.fifo = is_fifo(queue)
        self.visibility = broker.config.sqs.visibility_timeout or 0
        #: Receipt handles taken and not yet settled: the heartbeat keeps them hidden.
        self.held: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        #: Acks of one moment, sent together by DeleteMessageBatch (tasks of one receive tend
        #: to finish together).
        self._acks: list[tuple[str, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.visibility:  # the queue's own setting
            async with self.broker.clients.call(f"reading SQS queue {self.queue!r}") as sqs:
                response = await sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["VisibilityTimeout"])
            self.visibility = int(response["Attributes"]["VisibilityTimeout"])
        self.visibility = max(1, self.visibility)
        self._heartbeat = asyncio.ensure_future(self._keep_hidden())

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        wait = self.broker.config.sqs.wait_time_seconds if timeout is None else timeout
        if timeout is None and not wait:
            wait = 1  # Go's 0 re-polls without pause; a one-second long poll costs nothing more
        request: dict[str, Any] = {
            "QueueUrl": self.url,
            "MaxNumberOfMessages": max(1, min(BATCH, max_count)),
            "WaitTimeSeconds": int(min(MAX_WAIT, max(0, wait))),
            "VisibilityTimeout": self.visibility,
            "MessageAttributeNames": ["All"],
            "AttributeNames": ["SentTimestamp"],
        }
        async with self.broker.clients.call(f"receiving from SQS queue {self.queue!r}") as sqs:
            response = await sqs.receive_message(**request)
        deliveries = []
        for message in response.get("Messages") or []:
            handle = message["ReceiptHandle"]
            self.held.add(handle)
            body = message_body(message)
            left = seconds_to_eta(body)
            if left > 0:  # never run early: a fraction of a second left is one more (short) delay
                await self._delay_again(body, handle, left)
                continue
            deliveries.append(Delivery(body, self.queue, handle))
        return deliveries

    async def _delay_again(self, body: bytes, handle: str, left: float) -> None:
        """A message that came before its ETA: the next hop of its delay."""
        async with self.broker.clients.call(f"delaying a message on {self.queue!r}") as sqs:
            if self.fifo:
                await change_visibility(sqs, self.url, [handle], min(MAX_VISIBILITY, math.ceil(left)))
            else:
                await sqs.send_message(
                    **{"QueueUrl": self.url, **single_entry(self.broker._entry(self.queue, "0", body, left))}
                )
                await delete_messages(sqs, self.url, [handle])
        self.held.discard(handle)

    async def ack(self, delivery: Delivery) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks.append((delivery.receipt, done))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush_acks())
        await done
        self.held.discard(delivery.receipt)

    async def _flush_acks(self) -> None:
        # Let the acks of the next moments join: a task's result is already stored (its waiter
        # has it), so this delays only the deletion, by less than a request to SQS takes.
        if len(self._acks) < BATCH:
            await asyncio.sleep(ACK_GATHER)
        while self._acks:
            batch, self._acks = self._acks[:BATCH], self._acks[BATCH:]
            try:
                async with self.broker.clients.call(f"deleting messages from {self.queue!r}") as sqs:
                    await delete_messages(sqs, self.url, [handle for handle, _ in batch])
            except Exception as exc:  # each ack fails alone and is retried by the worker
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        self._flushing = None

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        # Hidden for ``delay`` seconds, then any worker may take it; the body stays as it was.
        async with self.broker.clients.call(f"returning a message to {self.queue!r}") as sqs:
            await change_visibility(sqs, self.url, [delivery.receipt], min(MAX_VISIBILITY, math.ceil(delay)))
        self.held.discard(delivery.receipt)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        dead = dead_queue_name(self.queue)
        dead_url = await self.broker.ensure_queue(dead)
        text = delivery.body.decode("utf-8", errors="replace")
        message: dict[str, Any] = {
            "QueueUrl": dead_url,
            "MessageBody": text or "(empty message)",
            "MessageAttributes": {
                _REASON: {"DataType": "String", "StringValue": reason[:4000] or "unknown"},
                _DEAD_TIME: {"DataType": "String", "StringValue": datetime.now(timezone.utc).isoformat()},
                _FROM_QUEUE: {"DataType": "String", "StringValue": self.queue},
            },
        }
        if self.fifo:
            message["MessageGroupId"] = "dead"
            message["MessageDeduplicationId"] = hashlib.sha256(delivery.body + reason.encode()).hexdigest()
        async with self.broker.clients.call(f"dead-lettering a message of {self.queue!r}") as sqs:
            await sqs.send_message(**message)
            await delete_messages(sqs, self.url, [delivery.receipt])
        self.held.discard(delivery.receipt)

    async def leave_for_redrive(self, delivery: Delivery) -> bool:
        # Not deleted and no longer kept hidden: it is received again once its visibility
        # timeout runs out, and the queue's RedrivePolicy counts each receive, as with Go.
        self.held.discard(delivery.receipt)
        return True

    async def close(self) -> None:
        self.abandon()
        if self.held:
            handles, self.held = list(self.held), set()
            with contextlib.suppress(Exception):  # unreturned, they come back after the timeout anyway
                async with self.broker.clients.call(f"returning messages to {self.queue!r}") as sqs:
                    await change_visibility(sqs, self.url, handles, 0)
            log.logger.info("Returned %d unfinished message(s) to %r", len(handles), self.queue)

    def abandon(self) -> None:
        """Stop extending visibility, as a dead worker would (the messages come back by themselves)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def _keep_hidden(self) -> None:
        interval = max(0.5, self.visibility / 3)
        while True:
            await asyncio.sleep(interval)
            handles = list(self.held)
            if not handles:
                continue
            try:
                async with self.broker.clients.call(f"extending visibility on {self.queue!r}") as sqs:
                    await change_visibility(sqs, self.url, handles, self.visibility)
            except Exception as exc:  # the next beat tries again; the worker logs fetch errors
                log.logger.debug("visibility heartbeat failed: %s", exc)


__all__ = ["SQSBroker", "SQSConsumer", "dead_queue_name"]
