"""The embedded driver: one SQLite file per test as broker, result backend and lock."""

from __future__ import annotations

import sqlite3
import time
from typing import Any, ClassVar

from machinery import Server
from machinery.backends.sqlite import SQLiteBackend
from machinery.brokers.base import Consumer
from machinery.brokers.sqlite import SQLiteBroker

from .base import Harness


def _rows(conn: sqlite3.Connection, sql: str, *params: object) -> list[Any]:
    return conn.execute(sql, params).fetchall()


class SQLiteHarness(Harness):
    name: ClassVar[str] = "sqlite"

    def url(self, queue: str) -> str:
        return f"sqlite:///{self.tmp_path / 'machinery.db'}"

    async def _broker_rows(self, server: Server, sql: str, *params: object) -> list[Any]:
        assert isinstance(server.broker, SQLiteBroker)
        return await server.broker.store.run(_rows, sql, *params)

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        sql = (
            "SELECT body FROM messages WHERE queue = ? AND avail_at <= ? AND lease_expires <= ?"
            " ORDER BY priority DESC, avail_at, id"
        )
        now = time.time_ns()
        return [bytes(body) for (body,) in await self._broker_rows(server, sql, queue, now, now)]

    async def taken_count(self, server: Server, queue: str) -> int:
        sql = "SELECT COUNT(*) FROM messages WHERE queue = ? AND lease_owner IS NOT NULL AND lease_expires > ?"
        return int((await self._broker_rows(server, sql, queue, time.time_ns()))[0][0])

    def abandon(self, consumer: Consumer) -> None:
        # A SIGKILLed worker renews nothing: its leases run out after heartbeat_timeout.
        consumer._renewer.cancel()  # type: ignore[attr-defined]

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        assert isinstance(server.backend, SQLiteBackend)
        rows = await server.backend.store.run(_rows, "SELECT expires_at FROM task_states WHERE uuid = ?", task_uuid)
        return None if not rows else (int(rows[0][0]) - time.time_ns()) / 1e9
