"""The embedded SQLite result backend, on the same file (and connection) as the SQLite broker.

Task states are stored as the JSON the Redis backend stores (``TaskState.encode()``), keyed by
task UUID, with an expiry of ``results_expire_in`` seconds refreshed on every write. Expired
rows are invisible at once and deleted lazily. Group metadata has its own table and expiry.

``await_state`` wakes at once on a completion written by any process: this process's writes
notify its waiters directly, and the store's watcher, poked by the writing process (see
``_drivers.sqlite_wake``; a ``PRAGMA data_version`` poll is the safety net), looks up which
watched tasks completed. The state writes of one loop tick share one transaction.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time
from collections.abc import Sequence

from .._drivers.sqlite import SQLiteStore, StoreHandle, now_ns, ns_after, transaction
from .._drivers.sqlite_batch import TickBatcher
from ..config import Config
from ..state import COMPLETED_STATES, RECEIVED, STARTED, GroupMeta, TaskState, WorkerInfo
from .base import Backend, decode_workers

#: Seconds between two sweeps of expired rows by one backend object.
PURGE_INTERVAL = 60.0
#: States that only say a worker began: flushed to disk by the next final state.
_STARTING = frozenset((RECEIVED, STARTED))
#: Most host parameters put in one ``IN (...)`` list.
_CHUNK = 500


class SQLiteBackend(Backend):
    """Task states and group metadata in a SQLite file shared by every process on the machine."""

    idle_loop_ok = True  # nothing to keep up between calls

    writes_batches_atomically = True  # one transaction

    #: A safety net only: completions wake ``await_state`` through notifications (see module doc).
    poll_interval = 1.0

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._handle = StoreHandle(url)
        # Every backend object on this file in this process wakes the same waiters.
        self._waiters = self._handle.store.waiters
        self._next_purge = 0.0
        #: The state writes of one loop tick, stored in one transaction (one commit).
        self._writes: TickBatcher[tuple[list[TaskState], bool], list[tuple[str, bytes]]] = TickBatcher(
            self._submit_writes
        )

    @property
    def store(self) -> SQLiteStore:
        """The process-wide store of this backend's database file."""
        return self._handle.store

    def _purge_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_purge:
            return False
        self._next_purge = now + PURGE_INTERVAL
        return True

    # ------------------------------------------------------------------ states

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        if not states:
            return
        # The caller returns only once the transaction holding its states has committed.
        completed = await self._writes.add((list(states), keep_created))
        waiters = self.store.waiters
        for task_uuid, body in completed:
            waiters.notify(task_uuid, body)

    def _submit_writes(
        self, groups: list[tuple[list[TaskState], bool]]
    ) -> concurrent.futures.Future[list[list[tuple[str, bytes]]]]:
        """One tick's writes, as one job on the database thread."""
        store = self.store
        # A worker's STARTED (or RECEIVED) is not flushed by itself: lost on a power failure,
        # it goes with the lease written before it (also unflushed), and the task runs again.
        # The final state, flushed, takes both to disk first (the WAL is written in order).
        if all(state.state in _STARTING for states, _ in groups for state in states):
            return store.submit(store.unflushed, _write_groups, groups, self.ttl, self._purge_due())
        return store.submit(_write_groups, groups, self.ttl, self._purge_due())

    async def get_state(self, task_uuid: str) -> TaskState | None:
        raw = await self.store.run(_get_state, task_uuid)
        return None if raw is None else TaskState.decode(raw)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        found = await self.store.run(_get_states, list(task_uuids))
        return [None if (raw := found.get(u)) is None else TaskState.decode(raw) for u in task_uuids]

    async def _subscribe(self, task_uuid: str) -> SQLiteStore:
        store = self.store
        await store.watch_result(task_uuid)
        return store

    async def _unsubscribe(self, task_uuid: str, handle: SQLiteStore) -> None:
        handle.unwatch_result(task_uuid)

    async def purge_state(self, task_uuid: str) -> None:
        await self.store.run(_delete, "task_states", task_uuid)

    # ------------------------------------------------------------------ groups

    async def write_group_meta(self, meta: GroupMeta) -> None:
        await self.store.run(_write_group, meta.group_uuid, meta.encode().decode(), self.ttl, self._purge_due())

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        raw = await self.store.run(_get_group, group_uuid)
        return None if raw is None else GroupMeta.decode(raw)

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        return await self.store.run(_trigger_chord, group_uuid, self.ttl)

    async def purge_group_meta(self, group_uuid: str) -> None:
        await self.store.run(_delete, "group_metas", group_uuid)

    # ------------------------------------------------------------------ beside the state

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        await self.store.run(_write_annotation, task_uuid, name, value, self.ttl)

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        return await self.store.run(_get_annotation, task_uuid, name)

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        await self.store.run(_revoke, task_uuid, terminate, self.ttl)

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        return await self.store.run(_revocations, since)

    # ------------------------------------------------------------------ workers

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self.store.run(_write_worker, info.tag, info.encode().decode(), ttl)

    async def forget_worker(self, tag: str) -> None:
        await self.store.run(_forget_worker, tag)

    async def get_workers(self) -> list[WorkerInfo]:
        return decode_workers(await self.store.run(_live_workers))

    async def close(self) -> None:
        self._handle.release()


# ---------------------------------------------------------------------------------- statements
# Each runs on the store's database thread and is all-or-nothing (retried when busy).


def _write_groups(
    conn: sqlite3.Connection, groups: list[tuple[list[TaskState], bool]], ttl: int, purge: bool
) -> list[list[tuple[str, bytes]]]:
    """Write each caller's states, in order, in one transaction; per caller, return (uuid,
    stored JSON) of the completed ones, for their waiters."""
    with transaction(conn):
        return [
            store_states(conn, states, keep_created, ttl, purge and i == 0)
            for i, (states, keep_created) in enumerate(groups)
        ]


def store_states(
    conn: sqlite3.Connection, states: Sequence[TaskState], keep_created: bool, ttl: int, purge: bool
) -> list[tuple[str, bytes]]:
    """Write the states inside a transaction the caller holds; return (uuid, stored JSON) of
    the completed ones, for their waiters."""
    completed: list[tuple[str, bytes]] = []
    now = now_ns()
    if purge:
        _purge(conn, now)
    expires = ns_after(ttl)
    for state in states:
        if keep_created:
            row = conn.execute(
                "SELECT body FROM task_states WHERE uuid = ? AND expires_at > ?", (state.task_uuid, now)
            ).fetchone()
            if row is not None:
                state.created_at = TaskState.decode(row[0]).created_at
        body = state.encode()
        # REPLACE gives the row a new seq, which is how the watcher finds recent writes.
        conn.execute(
            "REPLACE INTO task_states (uuid, state, body, expires_at) VALUES (?, ?, ?, ?)",
            (state.task_uuid, state.state, body.decode(), expires),
        )
        if state.state in COMPLETED_STATES:
            completed.append((state.task_uuid, body))
    return completed


def _get_state(conn: sqlite3.Connection, task_uuid: str) -> str | None:
    row = conn.execute(
        "SELECT body FROM task_states WHERE uuid = ? AND expires_at > ?", (task_uuid, now_ns())
    ).fetchone()
    return None if row is None else str(row[0])


def _get_states(conn: sqlite3.Connection, task_uuids: list[str]) -> dict[str, str]:
    now = now_ns()
    found: dict[str, str] = {}
    for start in range(0, len(task_uuids), _CHUNK):
        chunk = task_uuids[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT uuid, body FROM task_states WHERE uuid IN ({marks}) AND expires_at > ?", (*chunk, now)
        ).fetchall()
        found.update((str(u), str(body)) for u, body in rows)
    return found


def _write_group(conn: sqlite3.Connection, group_uuid: str, body: str, ttl: int, purge: bool) -> None:
    with transaction(conn):
        if purge:
            _purge(conn, now_ns())
        conn.execute(
            "REPLACE INTO group_metas (uuid, body, expires_at) VALUES (?, ?, ?)", (group_uuid, body, ns_after(ttl))
        )


def _get_group(conn: sqlite3.Connection, group_uuid: str) -> str | None:
    row = conn.execute(
        "SELECT body FROM group_metas WHERE uuid = ? AND expires_at > ?", (group_uuid, now_ns())
    ).fetchone()
    return None if row is None else str(row[0])


def _trigger_chord(conn: sqlite3.Connection, group_uuid: str, ttl: int) -> bool:
    # BEGIN IMMEDIATE holds the write lock from the read to the write: one caller, in any
    # process, sees ChordTriggered false and flips it.
    with transaction(conn):
        row = conn.execute(
            "SELECT body FROM group_metas WHERE uuid = ? AND expires_at > ?", (group_uuid, now_ns())
        ).fetchone()
        if row is None:
            return False
        meta = GroupMeta.decode(row[0])
        if meta.chord_triggered:
            return False
        meta.chord_triggered = True
        conn.execute(
            "UPDATE group_metas SET body = ?, expires_at = ? WHERE uuid = ?",
            (meta.encode().decode(), ns_after(ttl), group_uuid),
        )
    return True


def _write_annotation(conn: sqlite3.Connection, task_uuid: str, name: str, value: str, ttl: int) -> None:
    conn.execute(
        "REPLACE INTO annotations (uuid, name, value, expires_at) VALUES (?, ?, ?, ?)",
        (task_uuid, name, value, ns_after(ttl)),
    )


def _get_annotation(conn: sqlite3.Connection, task_uuid: str, name: str) -> str | None:
    row = conn.execute(
        "SELECT value FROM annotations WHERE uuid = ? AND name = ? AND expires_at > ?", (task_uuid, name, now_ns())
    ).fetchone()
    return None if row is None else str(row[0])


def _revoke(conn: sqlite3.Connection, task_uuid: str, terminate: bool, ttl: int) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM revocations WHERE expires_at <= ?", (now_ns(),))
        conn.execute(
            "REPLACE INTO revocations (uuid, terminate, expires_at) VALUES (?, ?, ?)",
            (task_uuid, int(terminate), ns_after(ttl)),
        )


def _revocations(conn: sqlite3.Connection, since: int) -> tuple[int, dict[str, bool]] | None:
    # The version is the last seq (REPLACE gives a new one); it only grows.
    version = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM revocations").fetchone()[0])
    if version == since:
        return None
    rows = conn.execute("SELECT uuid, terminate FROM revocations WHERE expires_at > ?", (now_ns(),)).fetchall()
    return version, {str(u): bool(t) for u, t in rows}


def _write_worker(conn: sqlite3.Connection, tag: str, body: str, ttl: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM workers WHERE expires_at <= ?", (now_ns(),))
        conn.execute("REPLACE INTO workers (tag, body, expires_at) VALUES (?, ?, ?)", (tag, body, ns_after(ttl)))


def _forget_worker(conn: sqlite3.Connection, tag: str) -> None:
    conn.execute("DELETE FROM workers WHERE tag = ?", (tag,))


def _live_workers(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT body FROM workers WHERE expires_at > ? ORDER BY tag", (now_ns(),)).fetchall()
    return [str(body) for (body,) in rows]


def _delete(conn: sqlite3.Connection, table: str, key: str) -> None:
    assert table in ("task_states", "group_metas")
    conn.execute(f"DELETE FROM {table} WHERE uuid = ?", (key,))


def _purge(conn: sqlite3.Connection, now: int) -> None:
    conn.execute("DELETE FROM task_states WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM group_metas WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM annotations WHERE expires_at <= ?", (now,))
