"""The embedded SQLite broker: the default, for several processes on one machine.

Messages are rows. A consumer takes rows by writing its lease (owner and expiry) on them
in one atomic statement and renews its leases every ``heartbeat_timeout / 3`` seconds; a
row whose lease has expired (its worker was SIGKILLed, or the machine lost power) can be
taken by any consumer. ``ack`` deletes the row, ``requeue`` clears the lease and moves the
row to the back of its queue, ``dead_letter`` moves it to the ``dead_letters`` table.

Delayed messages are the same rows with an ``avail_at`` in the future; ready messages have
the time they were published, so ordering by ``(priority DESC, avail_at, id)`` takes higher
priorities first, FIFO within a priority, and releases a delayed message at the back of its
priority when it falls due, as Go's mover does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import log
from .._drivers.sqlite import SQLiteStore, StoreHandle, now_ns, ns_after, transaction
from .._drivers.sqlite_batch import TickBatcher
from ..backends.base import Backend, pending_states
from ..backends.sqlite import store_states
from ..config import Config
from ..signature import Signature
from ..state import TaskState
from ..types import unix_ns
from .base import MAX_PRIORITY, Broker, Consumer, DeadLetter, Delivery, decode_all

#: Shortest wait between two looks at the queue, so a clock oddity never makes a busy loop.
MIN_WAIT = 0.001
#: How long a fetch waits for a message when the worker leaves it to the broker (writes wake
#: it at once, so this only bounds one call).
POLL_SECONDS = 1.0

# (row id, body) of the rows taken, and when (Unix ns) the next row will be free to take.
_Claimed = tuple[list[tuple[int, bytes]], int | None]


class SQLiteBroker(Broker):
    """Queues in a SQLite file (``sqlite:///machinery.db``) shared by every process on the machine."""

    idle_loop_ok = True  # nothing to keep up between calls

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._handle = StoreHandle(url)

    @property
    def store(self) -> SQLiteStore:
        """The process-wide store of this broker's database file."""
        return self._handle.store

    async def _push(self, messages: Sequence[tuple[str, bytes]]) -> None:
        store = self.store
        await store.run(_insert, [(queue, body, None, 0) for queue, body in messages])
        store.wake_queues()

    async def _push_prioritized(self, messages: Sequence[tuple[str, bytes, int]]) -> None:
        store = self.store
        await store.run(_insert, [(queue, body, None, priority) for queue, body, priority in messages])
        store.wake_queues()

    async def _push_delayed(self, messages: Sequence[tuple[Signature, bytes]]) -> None:
        store = self.store
        await store.run(_insert, _delayed_rows(messages))
        store.wake_queues()  # waiting consumers may need to wake earlier for the new ETA

    async def publish_with_pending(self, signatures: Sequence[Signature], backend: Backend) -> None:
        """PENDING and the messages in one transaction (one commit, one fsync) when the backend
        is this same database file: no consumer, in any process, can see the messages before
        their PENDING is stored, which is Go's order. Otherwise as every broker does."""
        store = self.store
        if getattr(backend, "store", None) is not store:
            await super().publish_with_pending(signatures, backend)
            return
        ready, prioritized, delayed = self._sort(signatures)
        rows: list[_Row] = [(queue, body, None, 0) for queue, body in ready]
        rows += [(queue, body, None, priority) for queue, body, priority in prioritized]
        rows += _delayed_rows(delayed)
        await store.run(_insert_with_pending, rows, pending_states(signatures), backend.ttl)
        store.wake_queues()

    async def open_consumer(self, queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        handle = StoreHandle(self.url)
        try:
            await handle.store.ensure_open()  # report a bad path or a locked file now, not at the first fetch
        except BaseException:
            handle.release()
            raise
        return SQLiteConsumer(handle, queue, f"{consumer_tag}#{uuid.uuid4().hex[:12]}", self.config)

    async def get_pending_tasks(self, queue: str | None = None) -> list[Signature]:
        rows = await self.store.run(_pending, queue or self.config.default_queue)
        return decode_all(rows)

    async def get_delayed_tasks(self) -> list[Signature]:
        return decode_all(await self.store.run(_delayed))

    async def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        rows = await self.store.run(_dead_letters, queue or self.config.default_queue)
        return [DeadLetter(q, reason, _datetime(ns), bytes(body)) for q, reason, ns, body in rows]

    async def requeue_dead(self, queue: str | None = None) -> int:
        store = self.store
        count = await store.run(_requeue_dead, queue or self.config.default_queue)
        if count:
            store.wake_queues()
        return count

    async def queue_depth(self, queue: str | None = None) -> int:
        return await self.store.run(_count_ready, queue or self.config.default_queue)

    async def dead_count(self, queue: str | None = None) -> int:
        return await self.store.run(_count_dead, queue or self.config.default_queue)

    async def delayed_count(self, queue: str | None = None) -> int:
        return await self.store.run(_count_delayed, queue or self.config.default_queue)

    async def purge(self, queue: str | None = None) -> int:
        return await self.store.run(_purge_ready, queue or self.config.default_queue)

    async def purge_dead(self, queue: str | None = None) -> int:
        return await self.store.run(_purge_dead, queue or self.config.default_queue)

    async def ping(self) -> None:
        await self.store.run(_noop_query)

    async def delete_queue(self, queue: str) -> None:
        await self.store.run(_delete_queue, queue)

    async def close(self) -> None:
        self._handle.release()


class SQLiteConsumer(Consumer):
    """One worker's leases on one queue; ``receipt`` is the row id."""

    def __init__(self, handle: StoreHandle, queue: str, owner: str, config: Config) -> None:
        self.queue = queue
        self.owner = owner
        self._handle = handle
        self._store = handle.store
        self._config = config
        self._closed = False
        #: The acks of one loop tick, in one transaction (one commit).
        self._acks: TickBatcher[int, bool] = TickBatcher(self._submit_acks)
        self._renewer = asyncio.ensure_future(self._renew_forever())

    def _lease_seconds(self) -> float:
        return self._config.heartbeat_timeout

    async def fetch(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        if max_count <= 0 or self._closed:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (POLL_SECONDS if timeout is None else max(0.0, timeout))
        store = self._store
        while True:
            woken, unregister = store.queue_waiter(loop)
            try:
                # A lease lost on a power failure only makes the message free again (and the
                # STARTED written after it, unflushed as well, goes with it): not flushed.
                claim = store.submit(store.unflushed, _claim, self.queue, self.owner, max_count, self._lease_seconds())
                try:
                    rows, next_due = await asyncio.wrap_future(claim)
                except asyncio.CancelledError:
                    # The claim may still complete on the database thread: hand its rows back.
                    claim.add_done_callback(self._release_abandoned)
                    raise
                if rows:
                    return [Delivery(body, self.queue, row_id) for row_id, body in rows]
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                wait = remaining
                if next_due is not None:
                    wait = min(wait, max(MIN_WAIT, (next_due - now_ns()) / 1e9))
                await asyncio.wait({woken}, timeout=wait)
            finally:
                unregister()

    def _release_abandoned(self, claim: concurrent.futures.Future[_Claimed]) -> None:
        if claim.cancelled() or claim.exception() is not None:
            return
        ids = [row_id for row_id, _ in claim.result()[0]]
        if ids:
            # If the store is closed, close() has released every lease of this owner already.
            with contextlib.suppress(Exception):
                self._store.submit(_release, self.owner, ids)

    async def ack(self, delivery: Delivery) -> None:
        if not await self._acks.add(delivery.receipt):
            log.logger.warning(
                "Acknowledged message %s of %r was no longer leased by this worker (lease expired); "
                "another worker may run it again",
                delivery.receipt,
                self.queue,
            )

    def _submit_acks(self, row_ids: list[int]) -> concurrent.futures.Future[list[bool]]:
        # Not flushed by itself: an acknowledgement lost on a power failure runs the task again
        # (at-least-once), and the final state written before it is flushed already.
        store = self._store
        return store.submit(store.unflushed, _ack_many, row_ids, self.owner)

    async def requeue(self, delivery: Delivery, delay: float = 0.0) -> None:
        if await self._store.run(_requeue, delivery.receipt, self.owner, max(0.0, delay)):
            self._store.wake_queues()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if not await self._store.run(_dead_letter, delivery.receipt, self.owner, reason):
            log.logger.warning(
                "Message %s of %r was not dead-lettered here: its lease expired and another worker has it",
                delivery.receipt,
                self.queue,
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._renewer.cancel()
        await asyncio.gather(self._renewer, return_exceptions=True)
        try:
            released = await self._store.run(_release_all, self.owner)
            if released:
                self._store.wake_queues()
        finally:
            self._handle.release()

    async def _renew_forever(self) -> None:
        """Keep this consumer's leases alive while it runs."""
        while True:
            await asyncio.sleep(self._lease_seconds() / 3)
            if self._store.closed:
                # Only when machinery is shut down (or the interpreter exits) under a running
                # consumer: its leases then run out and other workers take the messages.
                log.logger.debug("Stopped renewing the leases of %s: the store is closed", self.owner)
                return
            try:
                await self._store.run(_renew, self.owner, self._lease_seconds())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again; only a long outage loses leases
                if self._store.closed:
                    return
                log.logger.warning("Could not renew the leases of %s on %r: %s", self.owner, self.queue, exc)


# ---------------------------------------------------------------------------------- statements
# Each runs on the store's database thread and is all-or-nothing (retried when busy).


#: A message to insert: queue, body, when it may be taken (None: now) and its priority.
_Row = tuple[str, bytes, int | None, int]


def _insert(conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
    with transaction(conn):
        _insert_rows(conn, rows)


def _insert_rows(conn: sqlite3.Connection, rows: Sequence[_Row]) -> None:
    now = now_ns()  # taken inside the transaction, so ready rows are timed in commit order
    conn.executemany(
        "INSERT INTO messages (queue, body, avail_at, priority) VALUES (?, ?, ?, ?)",
        [(queue, body, now if at is None else at, priority) for queue, body, at, priority in rows],
    )


def _insert_with_pending(conn: sqlite3.Connection, rows: Sequence[_Row], states: Sequence[TaskState], ttl: int) -> None:
    with transaction(conn):
        store_states(conn, states, False, ttl, False)  # the backend's own writes purge expired rows
        _insert_rows(conn, rows)


def _delayed_rows(messages: Sequence[tuple[Signature, bytes]]) -> list[_Row]:
    rows: list[_Row] = []
    for signature, body in messages:
        assert signature.eta is not None
        rows.append((signature.routing_key, body, unix_ns(signature.eta), min(signature.priority, MAX_PRIORITY)))
    return rows


def _claim(conn: sqlite3.Connection, queue: str, owner: str, max_count: int, lease: float) -> _Claimed:
    now = now_ns()
    # Look first with a plain read: idle consumers wake on every commit, and a read takes
    # no write lock away from the processes doing real work.
    ready = conn.execute(
        "SELECT 1 FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ? LIMIT 1",
        (queue, now, now),
    ).fetchone()
    if ready is None:
        # Nothing to take: the next row becomes free when a delayed one falls due or when a
        # lease runs out (its consumer died). The second query walks only the leased rows
        # (the partial index), as many as there are tasks in flight.
        due = conn.execute(
            "SELECT MIN(avail_at) FROM messages WHERE queue = ? AND avail_at > ?", (queue, now)
        ).fetchone()[0]
        expiry = conn.execute(
            "SELECT MIN(lease_expires) FROM messages INDEXED BY messages_owner"
            " WHERE lease_owner IS NOT NULL AND queue = ? AND lease_expires > ?",
            (queue, now),
        ).fetchone()[0]
        moments = [m for m in (due, expiry) if m is not None]
        return [], min(moments) if moments else None
    with transaction(conn):
        now = now_ns()
        rows = conn.execute(
            "UPDATE messages SET lease_owner = ?, lease_expires = ? WHERE id IN ("
            " SELECT id FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ?"
            " ORDER BY priority DESC, avail_at, id LIMIT ?"
            ") RETURNING id, priority, avail_at, body",
            (owner, ns_after(lease), queue, now, now, max_count),
        ).fetchall()
    rows.sort(key=lambda row: (-row[1], row[2], row[0]))  # RETURNING has no order
    return [(row_id, bytes(body)) for row_id, _, _, body in rows], None


def _ack_many(conn: sqlite3.Connection, row_ids: list[int], owner: str) -> list[bool]:
    # A lease that expired stays ours until another consumer takes the row.
    with transaction(conn):
        return [
            conn.execute("DELETE FROM messages WHERE id = ? AND lease_owner = ?", (row_id, owner)).rowcount > 0
            for row_id in row_ids
        ]


def _requeue(conn: sqlite3.Connection, row_id: int, owner: str, delay: float) -> bool:
    # At the back of the queue (avail_at now), or among the delayed rows until then.
    cursor = conn.execute(
        "UPDATE messages SET lease_owner = NULL, lease_expires = 0, avail_at = ? WHERE id = ? AND lease_owner = ?",
        (ns_after(delay), row_id, owner),
    )
    return cursor.rowcount > 0


def _dead_letter(conn: sqlite3.Connection, row_id: int, owner: str, reason: str) -> bool:
    with transaction(conn):
        rows = conn.execute(
            "DELETE FROM messages WHERE id = ? AND lease_owner = ? RETURNING queue, body", (row_id, owner)
        ).fetchall()
        for queue, body in rows:
            conn.execute(
                "INSERT INTO dead_letters (queue, reason, time_ns, body) VALUES (?, ?, ?, ?)",
                (queue, reason, now_ns(), body),
            )
    return bool(rows)


def _release(conn: sqlite3.Connection, owner: str, ids: list[int]) -> None:
    # Back where they were (the head of the queue): they were never worked on.
    conn.executemany(
        "UPDATE messages SET lease_owner = NULL, lease_expires = 0 WHERE id = ? AND lease_owner = ?",
        [(row_id, owner) for row_id in ids],
    )


def _release_all(conn: sqlite3.Connection, owner: str) -> int:
    cursor = conn.execute("UPDATE messages SET lease_owner = NULL, lease_expires = 0 WHERE lease_owner = ?", (owner,))
    return cursor.rowcount


def _renew(conn: sqlite3.Connection, owner: str, lease: float) -> None:
    conn.execute("UPDATE messages SET lease_expires = ? WHERE lease_owner = ?", (ns_after(lease), owner))


def _pending(conn: sqlite3.Connection, queue: str) -> list[bytes]:
    now = now_ns()
    rows = conn.execute(
        "SELECT body FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ?"
        " ORDER BY priority DESC, avail_at, id",
        (queue, now, now),
    ).fetchall()
    return [bytes(body) for (body,) in rows]


def _delayed(conn: sqlite3.Connection) -> list[bytes]:
    rows = conn.execute("SELECT body FROM messages WHERE avail_at > ? ORDER BY avail_at, id", (now_ns(),)).fetchall()
    return [bytes(body) for (body,) in rows]


def _dead_letters(conn: sqlite3.Connection, queue: str) -> list[Any]:
    return conn.execute(
        "SELECT queue, reason, time_ns, body FROM dead_letters WHERE queue = ? ORDER BY id", (queue,)
    ).fetchall()


def _requeue_dead(conn: sqlite3.Connection, queue: str) -> int:
    with transaction(conn):
        rows = conn.execute("SELECT id, body FROM dead_letters WHERE queue = ? ORDER BY id", (queue,)).fetchall()
        if not rows:
            return 0
        now = now_ns()
        conn.executemany(
            "INSERT INTO messages (queue, body, avail_at) VALUES (?, ?, ?)", [(queue, body, now) for _, body in rows]
        )
        conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(row_id,) for row_id, _ in rows])
    return len(rows)


def _count_ready(conn: sqlite3.Connection, queue: str) -> int:
    now = now_ns()
    row = conn.execute(
        "SELECT count(*) FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ?", (queue, now, now)
    ).fetchone()
    return int(row[0])


def _count_delayed(conn: sqlite3.Connection, queue: str) -> int:
    row = conn.execute("SELECT count(*) FROM messages WHERE queue = ? AND avail_at > ?", (queue, now_ns())).fetchone()
    return int(row[0])


def _count_dead(conn: sqlite3.Connection, queue: str) -> int:
    return int(conn.execute("SELECT count(*) FROM dead_letters WHERE queue = ?", (queue,)).fetchone()[0])


def _purge_ready(conn: sqlite3.Connection, queue: str) -> int:
    now = now_ns()
    cursor = conn.execute(
        "DELETE FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ?", (queue, now, now)
    )
    return cursor.rowcount


def _purge_dead(conn: sqlite3.Connection, queue: str) -> int:
    return conn.execute("DELETE FROM dead_letters WHERE queue = ?", (queue,)).rowcount


def _noop_query(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1").fetchone()


def _delete_queue(conn: sqlite3.Connection, queue: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM messages WHERE queue = ? AND lease_owner IS NULL", (queue,))
        conn.execute("DELETE FROM dead_letters WHERE queue = ?", (queue,))


def _datetime(ns: int) -> datetime:
    seconds, rest = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc) + timedelta(microseconds=rest // 1000)
