"""A worker that decides chords on the AMQP result backend exactly as Go Machinery v2 does.

No Go toolchain is available to the test suite, so this peer follows Go's source step by step
(``v2/worker.go`` ``taskSucceeded``, ``v2/backends/amqp/amqp.go``; docs/wire.md §6.3, §11.2):
it consumes the same RabbitMQ queue as our worker, writes its states as Go writes them (our
AMQP backend writes byte-identical ones), and on a chord member's success it

1. counts the group queue's ready messages (``GroupCompleted``: ``== GroupTaskCount``; a
   queue that cannot be inspected counts as not complete);
2. defers ``PurgeGroupMeta`` (delete ``<group>_chord_triggered``, then the group queue);
3. asks ``TriggerChord``: true unless ``<group>_chord_triggered`` exists;
4. reads ``GroupTaskStates``: counts again (``Already consumed`` unless ``== GroupTaskCount``),
   consumes the group queue with an *exclusive* consumer and acks each of ``GroupTaskCount``
   deliveries; a cancelled consumer yields an empty delivery (a decode error);
5. sends the callback with every member's results appended, if all succeeded.

Go's worker waits for those deliveries forever; this peer gives up after ``hang_after`` seconds
and counts that as a hang, which a test asserts never happens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from machinery import SUCCESS, Server, Signature, TaskState
from machinery.types import Arg, encode_results


class GoAMQPPeer:
    """Runs ``tasks`` from ``server``'s default queue the way a Go v2 worker would, on its own loop."""

    def __init__(self, server: Server, tasks: dict[str, Callable[..., Any]], hang_after: float = 30.0) -> None:
        self.server = server
        self.tasks = tasks
        self.hang_after = hang_after
        self.hangs = 0
        self.callbacks_sent: list[str] = []
        self._url = server.config.broker
        self._connection: AbstractConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="go-peer", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> GoAMQPPeer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Go peer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        asyncio.run(self._consume())

    async def _consume(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        amqp = self.server.config.amqp
        self._connection = await aio_pika.connect(self._url)
        channel = await self._connection.channel()
        # Go: basic.qos(PrefetchCount), 3 when the configuration leaves it out (ours says 0 then).
        await channel.set_qos(prefetch_count=amqp.prefetch_count or 3)
        # Go's StartConsuming declares the exchange, the queue and its binding (docs/wire.md §10.1).
        exchange = await channel.declare_exchange(amqp.exchange, amqp.exchange_type, durable=True)
        queue = await channel.declare_queue(self.server.config.default_queue, durable=True)
        await queue.bind(exchange, amqp.binding_key)
        running: set[asyncio.Task[None]] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.ensure_future(self._process(message))
            running.add(task)
            task.add_done_callback(running.discard)

        tag = await queue.consume(on_message, no_ack=False)
        self._ready.set()
        await self._stop.wait()
        await queue.cancel(tag)
        await asyncio.gather(*running, return_exceptions=True)
        await self.server.aclose_loop_connections()
        await self._connection.close()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        """Go's Process for a registered task that succeeds, then ``basic.ack`` (docs/wire.md §10.4)."""
        signature = Signature.decode(message.body)
        if signature.name not in self.tasks:
            await message.nack(requeue=True)  # Go requeues an unregistered task
            return
        backend = self.server.backend
        await backend.write_states([TaskState(signature.uuid, "RECEIVED"), TaskState(signature.uuid, "STARTED")], True)
        values = [a.value for a in signature.args or ()]
        results = encode_results(self.tasks[signature.name](*values))
        await backend.set_state(signature, SUCCESS, results=results)
        await self._task_succeeded(signature)
        await message.ack()

    async def _task_succeeded(self, signature: Signature) -> None:
        callback, group_uuid, count = signature.chord_callback, signature.group_uuid, signature.group_task_count
        if not group_uuid or callback is None:
            return
        if await self._inspect(group_uuid) != count:  # GroupCompleted
            return
        try:  # defer PurgeGroupMeta
            if await self._inspect(f"{group_uuid}_chord_triggered") is not None:  # TriggerChord
                return
            states = await self._group_task_states(group_uuid, count)
            if states is None or not all(s.is_success() for s in states):
                return
            if not callback.immutable:
                for state in states:
                    callback.args = [
                        *(callback.args or ()),
                        *(Arg.from_wire(r.type, r.value) for r in state.results or ()),
                    ]
            await self.server.asend_task(callback)
            self.callbacks_sent.append(callback.uuid)
        finally:
            await self._delete(f"{group_uuid}_chord_triggered")
            await self._delete(group_uuid)

    async def _channel(self) -> AbstractChannel:
        assert self._connection is not None
        channel: AbstractChannel = await self._connection.channel()
        return channel

    async def _inspect(self, name: str) -> int | None:
        """``QueueInspect``: the ready-message count, or None when there is no such queue."""
        channel = await self._channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _group_task_states(self, group_uuid: str, count: int) -> list[TaskState] | None:
        if await self._inspect(group_uuid) != count:
            return None  # "Already consumed"
        channel = await self._channel()
        deliveries: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        try:
            queue = await channel.declare_queue(group_uuid, passive=True)

            async def on_delivery(message: AbstractIncomingMessage) -> None:
                await deliveries.put(message)

            # A deleted queue cancels the consumer (Go's deliveries channel closes): listen first.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda _frame: deliveries.put_nowait(None))
            channel.close_callbacks.add(lambda *_: deliveries.put_nowait(None))
            try:
                await queue.consume(on_delivery, no_ack=False, exclusive=True)
            except aiormq.exceptions.AMQPError:
                return None  # "Queue consume error": another exclusive consumer, or no queue
            states = []
            for _ in range(count):
                try:
                    delivered = await asyncio.wait_for(deliveries.get(), self.hang_after)
                except asyncio.TimeoutError:
                    self.hangs += 1
                    return None
                if delivered is None:
                    return None  # the consumer was cancelled: Go decodes an empty body and fails
                states.append(TaskState.decode(delivered.body))
                await delivered.ack()
            return states
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _delete(self, name: str) -> None:
        channel = await self._channel()
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.queue_delete(name)
        finally:
            if not channel.is_closed:
                await channel.close()
