"""The embedded SQLite lock: Go's lock semantics in one row per key, atomic across processes."""

from __future__ import annotations

import sqlite3

from .._drivers.sqlite import StoreHandle
from ..config import Config
from .base import Lock, now_ns


class SQLiteLock(Lock):
    """A key holds a deadline in Unix ns; it can be taken when absent or once that deadline has passed."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._handle = StoreHandle(url)

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        return await self._handle.store.run(_try_lock, key, deadline_ns, now_ns())

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
