"""What the RabbitMQ result backend keeps beside Go's state streams, in queues Go never reads:

* ``<uuid>.<name>``: a task's annotation (its progress, its traceback), one message long (a
  newer one drops the older), expiring with the results;
* ``<exchange>.revocations``: one message per revocation (``<uuid> <terminate 0|1>``), each
  expiring with the results; workers read the queue and put every message back;
* ``<exchange>.workers``: worker heartbeats, each expiring after the heartbeat timeout, and a
  ``gone:<tag>`` message from a worker that stopped; the queue expires ``WORKERS_QUEUE_EXPIRY``
  seconds after the last heartbeat. Its arguments are the same for every worker, whatever its
  settings: RabbitMQ refuses (and closes the channel of) a declaration whose arguments differ
  from the existing queue's, and that channel carries the worker's state writes too.
"""

from __future__ import annotations

from collections.abc import Callable

import aiormq

from ... import log
from ..._drivers.amqp import AMQPConnector, AMQPInt32, amqp_errors, expiry_ms_int32, give_back, message, peek_queue
from ...errors import MessageDecodeError
from ...state import WorkerInfo
from ..base import decode_workers

#: A worker that stopped publishes this, then its tag, to the workers queue.
GONE_PREFIX = b"gone:"
#: Seconds the workers queue outlives the last heartbeat published to it.
WORKERS_QUEUE_EXPIRY = 600


class BesideRecords:
    """Annotations, revocations and worker heartbeats of one backend (``exchange`` names the
    shared queues, read when used: the config may be reloaded)."""

    def __init__(self, connector: AMQPConnector, exchange: Callable[[], str]) -> None:
        self._connector = connector
        self._exchange = exchange

    # ------------------------------------------------------------------ annotations

    async def write_annotation(self, task_uuid: str, name: str, value: str, ttl: int) -> None:
        """The latest ``value`` in the queue ``<uuid>.<name>`` (one message: a newer one drops
        the older), expiring after ``ttl`` seconds. Go readers never look at it."""
        session = await self._connector.session()
        queue = f"{task_uuid}.{name}"
        expiry = expiry_ms_int32(ttl)
        arguments = {"x-max-length": AMQPInt32(1), "x-expires": expiry, "x-message-ttl": expiry}
        with amqp_errors(f"declaring {queue!r}"):
            await session.queue(queue, durable=False, auto_delete=False, arguments=arguments)
        await session.publish("", queue, message(value.encode(), content_type="text/plain"))

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        bodies = await self._peek(f"{task_uuid}.{name}")
        return bodies[-1].decode() if bodies else None

    # ------------------------------------------------------------------ revocations

    @property
    def revocations_queue(self) -> str:
        return f"{self._exchange() or 'machinery'}.revocations"

    async def revoke(self, task_uuid: str, terminate: bool, ttl: int) -> None:
        """A message in the revocations queue, expiring after ``ttl`` seconds."""
        session = await self._connector.session()
        queue = self.revocations_queue
        with amqp_errors(f"declaring {queue!r}"):
            await session.queue(queue, durable=True, auto_delete=False, arguments=None)
        body = f"{task_uuid} {1 if terminate else 0}".encode()
        await session.publish("", queue, message(body, expiration_ms=ttl * 1000))

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        revoked: dict[str, bool] = {}
        for body in await self._peek(self.revocations_queue):
            task_uuid, _, flag = body.decode(errors="replace").partition(" ")
            revoked[task_uuid] = revoked.get(task_uuid, False) or flag == "1"
        version = hash(frozenset(revoked.items())) & 0x7FFFFFFF  # what is live, not a count
        return None if version == since else (version, revoked)

    # ------------------------------------------------------------------ workers

    @property
    def workers_queue(self) -> str:
        return f"{self._exchange() or 'machinery'}.workers"

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Publish the heartbeat to the workers queue; each message expires after ``ttl``."""
        await self._publish_worker(info.encode(), ttl)

    async def forget_worker(self, tag: str) -> None:
        await self._publish_worker(GONE_PREFIX + tag.encode(), 60.0)

    async def _publish_worker(self, body: bytes, ttl: float) -> None:
        session = await self._connector.session()
        name = self.workers_queue
        # Declared with every heartbeat, not once per connection: publishing does not count as
        # using a queue for x-expires, so a queue declared once would expire under live workers.
        # On a channel of its own: a queue left by an older version with other arguments makes
        # RabbitMQ refuse the declaration and close the channel, which must not be the one the
        # state writes use.
        async with session.side_channel() as channel:
            with amqp_errors(f"declaring {name!r}"):
                try:
                    await channel.declare_queue(
                        name,
                        durable=False,
                        auto_delete=False,
                        arguments={"x-expires": expiry_ms_int32(WORKERS_QUEUE_EXPIRY)},
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    log.logger.debug("Using the workers queue %r as it was declared before: %s", name, exc)
        await session.publish("", name, message(body, expiration_ms=int(ttl * 1000)))

    async def get_workers(self) -> list[WorkerInfo]:
        """The latest heartbeat of each worker in the workers queue, minus the ones that said
        goodbye (the queue is read and every message put back)."""
        latest: dict[str, bytes | None] = {}
        for body in await self._peek(self.workers_queue):
            if body.startswith(GONE_PREFIX):
                latest[body[len(GONE_PREFIX) :].decode(errors="replace")] = None
                continue
            try:
                latest[WorkerInfo.decode(body).tag] = body
            except MessageDecodeError as exc:
                log.logger.warning("Ignoring a worker record that does not decode: %s", exc)
        return decode_workers([body for body in latest.values() if body is not None])

    # ------------------------------------------------------------------ reading

    async def _peek(self, name: str) -> list[bytes]:
        """The bodies in queue ``name``, oldest first, all put back ([] if there is no such queue)."""
        session = await self._connector.session()
        async with session.side_channel() as channel:
            with amqp_errors(f"reading {name!r}"):
                taken = await peek_queue(channel, name)
                await give_back(taken)
        return [incoming.body for incoming in taken]
