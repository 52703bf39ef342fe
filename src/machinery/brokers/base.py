"""The broker seam: publishing for everyone, a ``Consumer`` per worker for taking messages.

A consumer takes messages into a place of its own (a processing list, a lease, an unacked
delivery) and they leave it only by ``ack`` after the final state is written, by ``requeue``
or by ``dead_letter``. That is what makes delivery at-least-once: a worker that dies leaves
its messages where another worker gets them back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from ..config import Config
from ..errors import MessageDecodeError, UnsupportedOperation
from ..signature import Signature

if TYPE_CHECKING:
    from ..backends.base import Backend

#: Priorities run from 0 (the default, lowest) to 9; higher ones are taken first. (Go's field is
#: 0-255 and only RabbitMQ reads it; a higher value counts as 9 here.)
MAX_PRIORITY = 9


@dataclass(slots=True)
class Delivery:
    """One message a consumer has taken; ``receipt`` is the broker's handle for settling it."""

    body: bytes
    queue: str
    receipt: Any = None


@dataclass(slots=True)
class DeadLetter:
    """A message that could not be processed, with why and when."""

    queue: str
    reason: str
    time: datetime
    body: bytes

    def to_bytes(self) -> bytes:
        """A JSON header line, then the body exactly as it was (it need not be UTF-8 or JSON)."""
        header = msgspec.json.encode({"queue": self.queue, "reason": self.reason, "time": self.time.isoformat()})
        return header + b"\n" + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> DeadLetter:
        header, _, body = data.partition(b"\n")
        raw = msgspec.json.decode(header)
        return cls(queue=raw["queue"], reason=raw["reason"], time=datetime.fromisoformat(raw["time"]), body=body)

    @classmethod
    def now(cls, queue: str, reason: str, body: bytes) -> DeadLetter:
        return cls(queue, reason, datetime.now(timezone.utc), body)


class Consumer(ABC):
    """One worker's hold on one queue."""

    queue: str

    @abstractmethod
    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """Take up to ``max_count`` messages, waiting at most ``timeout`` seconds for the first.

        ``None`` waits as long as the broker's own poll setting says (a second or so); the
        worker calls it in a loop, so an empty list is a normal answer.
        """

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The message is done with: forget it for good."""

    @abstractmethod
    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Give the message back to the queue for any worker to take, ``delay`` seconds from
        now (the message is not changed, and nothing holds it meanwhile)."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the message to the dead-letter place of its queue with ``reason``."""

    async def leave_for_redrive(self, delivery: Delivery) -> bool:
        """A task sent with ``stop_task_deletion_on_error`` failed for good: leave its message
        undeleted, to come back after the queue's own timeout until the queue's redrive policy
        moves it (Go's ``ErrStopTaskDeletion``). True when the broker did so; a broker with no
        such policy returns False and the message is acked as usual (Go ignores the flag there)."""
        return False

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming; any message still taken goes back to the queue."""


class Broker(ABC):
    """Publishes signatures and opens consumers.

    Every method is a coroutine; the sync face is the Server's (``server.get_pending_tasks``
    and so on). ``url`` is the broker setting this instance serves (several URLs when
    ``multiple_broker_separator`` is set).
    """

    #: True where this driver's connections need nothing from their event loop between calls
    #: (no heartbeats to answer, no reconnection running in the background): sync calls may then
    #: run on a loop of the calling thread that sleeps between them (``_sync.run_sync``).
    idle_loop_ok: ClassVar[bool] = False

    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url

    # ------------------------------------------------------------------ publishing

    def routing_key_for(self, signature: Signature) -> str:
        """The queue a signature goes to when it names none (Go: the default queue)."""
        return self.config.default_queue

    async def publish(self, signature: Signature) -> None:
        """Send one signature: to its queue now, or to the delayed store if its ETA is ahead."""
        await self.publish_many((signature,))

    async def publish_many(self, signatures: Iterable[Signature]) -> None:
        """Send several signatures with as few round trips as the broker allows."""
        ready, prioritized, delayed = self._sort(signatures)
        if ready:
            await self._push(ready)
        if prioritized:
            await self._push_prioritized(prioritized)
        if delayed:
            await self._push_delayed(delayed)

    async def publish_with_pending(self, signatures: Sequence[Signature], backend: Backend) -> None:
        """Write PENDING for ``signatures`` in ``backend``, then publish them: Go's order, so that
        no worker can take a message whose state is not stored yet. A broker on the same server
        as the backend may do both in one round trip, keeping that order."""
        await backend.set_pending(signatures)
        await self.publish_many(signatures)

    def _sort(
        self, signatures: Iterable[Signature]
    ) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes, int]], list[tuple[Signature, bytes]]]:
        """Route and encode signatures: (queue, body) ready now, (queue, body, priority)
        prioritized, (signature, body) waiting for their ETA."""
        now = datetime.now(timezone.utc)
        ready: list[tuple[str, bytes]] = []
        prioritized: list[tuple[str, bytes, int]] = []
        delayed: list[tuple[Signature, bytes]] = []
        for signature in signatures:
            if not signature.routing_key:
                signature.routing_key = self.routing_key_for(signature)
            body = signature.encode()
            if signature.eta is not None and signature.eta > now:
                delayed.append((signature, body))
            elif signature.priority > 0:
                prioritized.append((signature.routing_key, body, min(signature.priority, MAX_PRIORITY)))
            else:
                ready.append((signature.routing_key, body))
        return ready, prioritized, delayed

    @abstractmethod
    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Append (queue, body) messages to their queues."""

    async def _push_prioritized(self, messages: Sequence[tuple[str, bytes, int]]) -> None:
        """Append (queue, body, priority 1-9) messages, to be taken before those of lower
        priority; a broker without priorities takes them in order."""
        await self._push([(queue, body) for queue, body, _ in messages])

    @abstractmethod
    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        """Store messages until their ETA."""

    # ------------------------------------------------------------------ consuming

    @abstractmethod
    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        """Start taking messages from ``queue`` for one worker.

        ``prefetch`` is how many messages the worker can run at once; a broker that pushes
        messages (RabbitMQ) must never hold more than that for it. Others may ignore it.
        """

    # ------------------------------------------------------------------ inspection

    @abstractmethod
    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        """The messages waiting in ``queue`` (default queue if None), oldest first, decoded."""

    @abstractmethod
    async def get_delayed_tasks(self) -> list[Signature]:
        """The messages waiting for their ETA, soonest first, decoded."""

    @abstractmethod
    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The dead letters of ``queue`` (default queue if None), oldest first."""

    @abstractmethod
    async def requeue_dead(self, queue: str | None = None) -> int:
        """Put the dead letters of ``queue`` back on it; returns how many."""

    # ------------------------------------------------------------------ operations

    async def queue_depth(self, queue: str | None = None) -> int:
        """How many messages wait ready in ``queue`` (default queue if None): neither delayed
        nor taken by a worker. Cheap (one count, no decoding), for metrics and dashboards."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot count a queue's messages")

    async def dead_count(self, queue: str | None = None) -> int:
        """How many dead letters ``queue`` (default queue if None) holds."""
        return len(await self.dead_letters(queue))

    async def delayed_count(self, queue: str | None = None) -> int:
        """How many messages for ``queue`` (default queue if None) wait for their ETA. The base
        decodes the delayed listing; drivers that can count without it override this."""
        name = queue or self.config.default_queue
        return sum(1 for s in await self.get_delayed_tasks() if s.routing_key == name)

    async def purge(self, queue: str | None = None) -> int:
        """Delete the messages waiting ready in ``queue`` (default queue if None); returns how
        many. Messages taken by a worker, delayed messages and dead letters are not touched."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot purge a queue")

    async def purge_dead(self, queue: str | None = None) -> int:
        """Delete the dead letters of ``queue`` (default queue if None); returns how many."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot purge dead letters")

    async def ping(self) -> None:
        """Return once the broker has answered a round trip; raise its connection error if not."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot be pinged")

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` with its waiting messages and its dead letters (on RabbitMQ the queue
        itself, so that it stops collecting tasks). Messages taken by a running consumer are
        not touched."""
        raise UnsupportedOperation(f"{type(self).__name__} cannot delete queues")

    async def close(self) -> None:
        """Release connections held by this broker."""

    async def close_loop_connections(self) -> None:
        """Close the connections bound to the running event loop (a worker's, when it ends);
        the broker stays usable from other loops."""


def decode_all(bodies: Iterable[bytes]) -> list[Signature]:
    """Decode inspected messages, skipping (not failing on) any that are not signatures."""
    out = []
    for body in bodies:
        try:
            out.append(Signature.decode(body))
        except MessageDecodeError:
            continue
    return out
