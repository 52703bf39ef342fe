"""The embedded SQLite lock: Go's lock semantics in one row per key, atomic across processes."""

from __future__ import annotations

import sqlite3
import time

from .._drivers.sqlite import StoreHandle, transaction
from ..config import Config
from .base import Lock, next_turn, now_ns


class SQLiteLock(Lock):
    """A key holds a deadline in Unix ns; it can be taken when absent or once that deadline has passed."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._handle = StoreHandle(url)

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        return await self._handle.store.run(_try_lock, key, deadline_ns, now_ns())

    async def claim(self, key: str, value: str, seconds: float) -> str | None:
        return await self._handle.store.run(_claim, key, value, seconds)

    async def release(self, key: str, value: str) -> bool:
        return await self._handle.store.run(_release, key, value)

    async def take_turn(self, key: str, interval: float, burst: int) -> float:
        return await self._handle.store.run(_take_turn, key, interval, burst)

    async def close(self) -> None:
        self._handle.release()


def _try_lock(conn: sqlite3.Connection, key: str, deadline_ns: int, now: int) -> bool:
    # One statement: insert the key, or overwrite it only if its deadline has passed. A row
    # comes back exactly when this caller took the lock.
    row = conn.execute(
        "INSERT INTO locks (key, deadline) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET deadline = excluded.deadline WHERE locks.deadline < ? "
        "RETURNING key",
        (key, deadline_ns, now),
    ).fetchall()
    return bool(row)


def _claim(conn: sqlite3.Connection, key: str, value: str, seconds: float) -> str | None:
    with transaction(conn):
        row = conn.execute("SELECT value, expires_at FROM claims WHERE key = ?", (key,)).fetchone()
        if row is not None and row[1] > now_ns():
            return str(row[0])
        conn.execute(
            "REPLACE INTO claims (key, value, expires_at) VALUES (?, ?, ?)", (key, value, now_ns() + int(seconds * 1e9))
        )
    return None


def _release(conn: sqlite3.Connection, key: str, value: str) -> bool:
    return conn.execute("DELETE FROM claims WHERE key = ? AND value = ?", (key, value)).rowcount > 0


def _take_turn(conn: sqlite3.Connection, key: str, interval: float, burst: int) -> float:
    with transaction(conn):  # BEGIN IMMEDIATE: one process at a time reads and moves the time
        row = conn.execute("SELECT arrival FROM rate_limits WHERE key = ?", (key,)).fetchone()
        wait, arrival = next_turn(None if row is None else float(row[0]), time.time(), interval, burst)
        conn.execute("REPLACE INTO rate_limits (key, arrival) VALUES (?, ?)", (key, arrival))
    return wait
