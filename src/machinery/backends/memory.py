"""An in-process result backend: the reference implementation the unit tests run on."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from .._loops import Waiters
from ..config import Config
from ..state import COMPLETED_STATES, GroupMeta, TaskState, WorkerInfo
from .base import Backend, decode_workers


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: dict[str, tuple[float, bytes]] = {}
        self.groups: dict[str, tuple[float, bytes]] = {}
        self.workers: dict[str, tuple[float, bytes]] = {}
        self.annotations: dict[str, tuple[float, bytes]] = {}
        self.revoked: dict[str, tuple[float, bytes]] = {}  # uuid -> (expiry, b"1" terminate / b"0")
        self.revoked_version = 0
        # Every backend object on this store must wake the same waiters.
        self.waiters = Waiters()


class MemoryBackend(Backend):
    """States kept as the same JSON the real backends store, with the same expiry."""

    idle_loop_ok = True  # nothing to keep up between calls

    writes_batches_atomically = True  # under one lock

    _stores: ClassVar[dict[str, _Store]] = {}
    _stores_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        with self._stores_lock:
            self._store = self._stores.setdefault(url, _Store())
        self._waiters = self._store.waiters
        self.poll_interval = 1.0

    def _expiry(self) -> float:
        return time.monotonic() + self.ttl

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        store = self._store
        done = []
        with store.lock:
            for state in states:
                if keep_created:
                    old = _live(store.states, state.task_uuid)
                    if old is not None:
                        state.created_at = TaskState.decode(old).created_at
                store.states[state.task_uuid] = (self._expiry(), state.encode())
                if state.state in COMPLETED_STATES:
                    done.append(state.task_uuid)
        for task_uuid in done:
            self._waiters.notify(task_uuid)

    async def get_state(self, task_uuid: str) -> TaskState | None:
        with self._store.lock:
            raw = _live(self._store.states, task_uuid)
        return None if raw is None else TaskState.decode(raw)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        with self._store.lock:
            raws = [_live(self._store.states, u) for u in task_uuids]
        return [None if raw is None else TaskState.decode(raw) for raw in raws]

    async def write_group_meta(self, meta: GroupMeta) -> None:
        with self._store.lock:
            self._store.groups[meta.group_uuid] = (self._expiry(), meta.encode())

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        with self._store.lock:
            raw = _live(self._store.groups, group_uuid)
        return None if raw is None else GroupMeta.decode(raw)

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        with self._store.lock:
            raw = _live(self._store.groups, group_uuid)
            if raw is None:
                return False
            meta = GroupMeta.decode(raw)
            if meta.chord_triggered:
                return False
            meta.chord_triggered = True
            self._store.groups[group_uuid] = (self._expiry(), meta.encode())
            return True

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        with self._store.lock:
            self._store.annotations[f"{name}:{task_uuid}"] = (self._expiry(), value.encode())

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        with self._store.lock:
            raw = _live(self._store.annotations, f"{name}:{task_uuid}")
        return None if raw is None else raw.decode()

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        with self._store.lock:
            self._store.revoked[task_uuid] = (self._expiry(), b"1" if terminate else b"0")
            self._store.revoked_version += 1

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        with self._store.lock:
            if self._store.revoked_version == since:
                return None
            live = {u: raw == b"1" for u in list(self._store.revoked) if (raw := _live(self._store.revoked, u))}
            return self._store.revoked_version, live

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        with self._store.lock:
            self._store.workers[info.tag] = (time.monotonic() + ttl, info.encode())

    async def forget_worker(self, tag: str) -> None:
        with self._store.lock:
            self._store.workers.pop(tag, None)

    async def get_workers(self) -> list[WorkerInfo]:
        with self._store.lock:
            records = [raw for tag in list(self._store.workers) if (raw := _live(self._store.workers, tag))]
        return decode_workers(records)

    async def purge_state(self, task_uuid: str) -> None:
        with self._store.lock:
            self._store.states.pop(task_uuid, None)

    async def purge_group_meta(self, group_uuid: str) -> None:
        with self._store.lock:
            self._store.groups.pop(group_uuid, None)


def _live(table: dict[str, tuple[float, bytes]], key: str) -> bytes | None:
    entry = table.get(key)
    if entry is None:
        return None
    if entry[0] < time.monotonic():
        del table[key]
        return None
    return entry[1]
