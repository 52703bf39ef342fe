"""Chords on the AMQP result backend with a Go worker and ours on one queue (docs/wire.md §11.2).

The Go worker is ``support.go_amqp_peer``: Go's chord protocol step by step, against the real
RabbitMQ. Chords come from our client (with the group metadata we store) and from a Go-style
client (which stores none). Every callback must run exactly once, every member once, and no
callback be recorded as failed because a Go peer deleted the group queue.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from machinery import (
    FAILURE,
    AMQPConfig,
    Chord,
    Config,
    Group,
    ResultConsumedError,
    Server,
    Signature,
    TaskNotFoundError,
    TaskState,
)
from machinery._sync import run_sync
from support.go_amqp_peer import GoAMQPPeer
from support.services import AMQP_URL, require_service
from support.waiting import WAIT, wait_until
from support.workers import running_worker

CHORDS = 30  # of each kind, as the fault-injection run that found the races had
MEMBERS = 3


class Record:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.members: Counter[int] = Counter()
        self.callbacks: Counter[str] = Counter()

    def member(self, value: int) -> int:
        with self.lock:
            self.members[value] += 1
        return value

    def callback(self, label: str, *results: int) -> str:
        with self.lock:
            self.callbacks[label] += 1
        return f"{label}:{sum(results)}"


@pytest.fixture
def config() -> Config:
    require_service("RabbitMQ", AMQP_URL, 5672)
    prefix = f"gochord_{uuid.uuid4().hex[:8]}"
    return Config(
        broker=AMQP_URL,
        result_backend=AMQP_URL,
        default_queue=f"{prefix}_q",
        results_expire_in=300,
        amqp=AMQPConfig(exchange=f"{prefix}_ex", binding_key=f"{prefix}_q", skip_publisher_queue=True),
    )


@pytest.fixture
def servers(config: Config) -> Iterator[tuple[Server, Server, Server]]:
    made = [Server(config) for _ in range(3)]  # our worker's, the Go peer's, the clients'
    yield made[0], made[1], made[2]
    try:
        run_sync(made[2].broker.delete_queue(config.default_queue))
    finally:
        for server in made:
            server.close()


def test_go_and_python_workers_complete_every_chord_exactly_once(servers: tuple[Server, Server, Server]) -> None:
    ours, go, client = servers
    record = Record()
    for server in (ours, go):
        server.register_task("member", record.member)
        server.register_task("chord_callback", record.callback)
    chords = []
    for i in range(2 * CHORDS):
        members = [Signature("member", [i * MEMBERS + j]) for j in range(MEMBERS)]
        chord = Chord(Group(*members), Signature("chord_callback", [f"chord{i}"]))
        chords.append(chord)
    with (
        GoAMQPPeer(go, {"member": record.member, "chord_callback": record.callback}) as peer,
        running_worker(ours, concurrency=4),
    ):
        results = [client.send_chord(c) for c in chords[:CHORDS]]
        # Go's client stores no group metadata (its InitGroup does nothing on AMQP).
        for chord in chords[CHORDS:]:
            run_sync(client.dispatcher.send_batch(chord.group.signatures))
        for i, result in enumerate(results):
            assert result.get(timeout=WAIT * 6) == f"chord{i}:{sum(range(i * MEMBERS, (i + 1) * MEMBERS))}"
        go_style = [client.result(c.callback.uuid) for c in chords[CHORDS:]]
        for i, result in enumerate(go_style, CHORDS):
            assert result.get(timeout=WAIT * 6) == f"chord{i}:{sum(range(i * MEMBERS, (i + 1) * MEMBERS))}"
        wait_until(lambda: sum(record.callbacks.values()) >= 2 * CHORDS, what="every callback run")
    assert peer.hangs == 0, "a Go worker waited forever for group states"
    assert record.callbacks == Counter({f"chord{i}": 1 for i in range(2 * CHORDS)})  # each exactly once
    assert record.members == Counter(range(2 * CHORDS * MEMBERS))  # each member once
    failed = [c.callback.uuid for c in chords if (s := client.result(c.callback.uuid).state()) and s.state == FAILURE]
    assert failed == []
    deciders = Counter("go" if c.callback.uuid in peer.callbacks_sent else "ours" for c in chords)
    assert set(deciders) <= {"go", "ours"} and sum(deciders.values()) == 2 * CHORDS


def test_reading_a_result_that_a_go_client_consumed_says_so(servers: tuple[Server, Server, Server]) -> None:
    ours, _, client = servers
    ours.register_task("member", lambda value: value)
    waiting = client.send_task(Signature("member", [7]))
    with running_worker(ours):
        go_async_result_get(client, waiting.task_uuid)
    with pytest.raises(ResultConsumedError) as info:
        waiting.get(timeout=WAIT)  # instead of waiting out the timeout
    assert "taken by another reader" in str(info.value) and info.value.task_uuid == waiting.task_uuid
    # Another process, which never saw the task, cannot tell it from one never sent, and says both.
    stranger = Server(client.config)
    stranger.config.unknown_task_grace = 0.5
    try:
        with pytest.raises(TaskNotFoundError, match="another reader"):
            stranger.result(waiting.task_uuid).get(timeout=WAIT)
    finally:
        stranger.close()


def go_async_result_get(server: Server, task_uuid: str) -> None:
    """Go's AsyncResult.Get on the AMQP backend: GetState (basic.get and ack the oldest state)
    until a final one, then PurgeState, which deletes the task's queue (docs/wire.md §16)."""
    import aio_pika

    async def read() -> None:
        connection = await aio_pika.connect(server.config.result_backend_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(task_uuid, passive=True)
            while True:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                if TaskState.decode(message.body).is_completed():
                    break
            await queue.delete(if_unused=False, if_empty=False)
        finally:
            await connection.close()

    asyncio.run(read())
