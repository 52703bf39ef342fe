"""The Memcache result backend, in Go Machinery's keys, values and expiry (docs/wire.md §11.3).

States live under the task UUID and group metadata under the group UUID, as the same JSON as
in Redis, with flags 0 and an absolute expiry (Unix seconds, ``now + results_expire_in``)
refreshed by every write. Servers are picked per key as gomemcache picks them (CRC-32 of the
key modulo the number of servers, in URL order), so Go and Python peers share a pool.

Where Go writes blindly, this backend uses memcached's ``gets``/``cas`` and ``add``:

- keeping the stored CreatedAt across later states is a compare-and-set, so two writers never
  lose each other's creation time;
- the chord flag flips with ``cas`` on the group's metadata: exactly one caller wins (Go's
  read, spin on ``Lock``, then write can let two Go workers both fire; a Go worker holding
  ``Lock`` is waited for, as Go waits).

Memcached has no notifications: a waiter in another process re-reads with a back-off that
starts at 10 ms and settles at 0.5 s. A waiter in the writing process is woken at once.
Memcached evicts under memory pressure: an evicted state reads as "no state" (PENDING for an
unfinished task, an unknown UUID after ``missing_grace``), and an evicted group loses its
chord (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from aiomcache.exceptions import ClientException

from .._drivers.memcache import MemcacheConnector
from ..config import Config
from ..errors import MessageDecodeError
from ..state import COMPLETED_STATES, GroupMeta, TaskState
from .base import Backend, PollSchedule, per_task

#: How long a chord trigger waits for a Go worker's ``Lock`` on the group before giving up.
CHORD_LOCK_WAIT = 10.0
#: Compare-and-set attempts on one key before the writer reports contention.
CAS_ATTEMPTS = 100
#: The one key holding every live revocation, as JSON: {"version": n, "revoked": {uuid: [terminate, until]}}.
REVOCATIONS_KEY = b"machinery:revocations"


class MemcacheBackend(Backend):
    """Task states and group metadata in memcached, in Go's keys and JSON."""

    connection_errors = (*Backend.connection_errors, ClientException)
    unknown_state_hint = ", or memcached evicted it (it drops entries under memory pressure)"

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.connector = MemcacheConnector(url)

    def _expiry(self) -> int:
        # Absolute, as Go writes it: memcached reads any exptime above 30 days as a Unix time.
        return int(time.time()) + self.ttl

    # ------------------------------------------------------------------ writes

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        await asyncio.gather(*(self._write_in_order(group, keep_created) for group in per_task(states)))

    async def _write_in_order(self, states: list[TaskState], keep_created: bool) -> None:
        for state in states:
            value = await (self._write_keeping_created(state) if keep_created else self._write(state))
            if state.state in COMPLETED_STATES:
                self._waiters.notify(state.task_uuid, value)

    async def _write(self, state: TaskState) -> bytes:
        key, value = state.task_uuid.encode(), state.encode()
        await self.connector.client_for(key).set(key, value, self._expiry())
        return value

    async def _write_keeping_created(self, state: TaskState) -> bytes:
        key = state.task_uuid.encode()
        client = self.connector.client_for(key)
        for _ in range(CAS_ATTEMPTS):
            old, token = await client.gets(key)
            if old is None:
                # No state yet (or evicted): as in Redis, the creation time is then unknown.
                value = dataclasses.replace(state, created_at=None).encode()
                if await client.add(key, value, self._expiry()):
                    return value
                continue  # someone added it meanwhile: keep theirs
            created = None
            with contextlib.suppress(MessageDecodeError):  # not a state: overwrite it
                created = TaskState.decode(old).created_at
            value = dataclasses.replace(state, created_at=created).encode()
            if token is not None and await client.cas(key, value, token, self._expiry()):
                return value
        raise TimeoutError(f"the state of {state.task_uuid} kept changing under {CAS_ATTEMPTS} writes")

    async def write_group_meta(self, meta: GroupMeta) -> None:
        key = meta.group_uuid.encode()
        await self.connector.client_for(key).set(key, meta.encode(), self._expiry())

    # ------------------------------------------------------------------ reads

    async def get_state(self, task_uuid: str) -> TaskState | None:
        key = task_uuid.encode()
        raw = await self.connector.client_for(key).get(key)
        return None if raw is None else TaskState.decode(raw)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        keys = [uuid.encode() for uuid in task_uuids]
        out: list[TaskState | None] = [None] * len(keys)

        async def read(client: Any, indices: list[int]) -> None:
            values = await client.multi_get(*(keys[i] for i in indices))
            for i, raw in zip(indices, values, strict=True):
                out[i] = None if raw is None else TaskState.decode(raw)

        await asyncio.gather(*(read(client, indices) for client, indices in self.connector.by_server(keys)))
        return out

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        key = group_uuid.encode()
        raw = await self.connector.client_for(key).get(key)
        return None if raw is None else GroupMeta.decode(raw)

    async def _subscribe(self, task_uuid: str) -> PollSchedule:
        return PollSchedule()

    def _poll_interval(self, handle: Any) -> float:
        return handle.next() if isinstance(handle, PollSchedule) else self.poll_interval

    # ------------------------------------------------------------------ beside the state

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        key = f"machinery:{name}:{task_uuid}".encode()
        await self.connector.client_for(key).set(key, value.encode(), self._expiry())

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        key = f"machinery:{name}:{task_uuid}".encode()
        raw = await self.connector.client_for(key).get(key)
        return None if raw is None else bytes(raw).decode()

    # ------------------------------------------------------------------ revocations

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        """Add ``task_uuid`` to the revocations key with ``cas`` (memcached has no sets): each
        entry lives as long as results do, and expired ones are dropped on every write."""
        client = self.connector.client_for(REVOCATIONS_KEY)
        for _ in range(CAS_ATTEMPTS):
            raw, token = await client.gets(REVOCATIONS_KEY)
            version, revoked = _decode_revocations(raw)
            now = time.time()
            revoked = {uuid: entry for uuid, entry in revoked.items() if entry[1] > now}
            revoked[task_uuid] = [terminate, now + self.ttl]
            value = json.dumps({"version": version + 1, "revoked": revoked}).encode()
            if raw is None:
                if await client.add(REVOCATIONS_KEY, value, self._expiry()):
                    return
            elif token is not None and await client.cas(REVOCATIONS_KEY, value, token, self._expiry()):
                return
        raise TimeoutError(f"the revocations kept changing under {CAS_ATTEMPTS} writes")

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        raw = await self.connector.client_for(REVOCATIONS_KEY).get(REVOCATIONS_KEY)
        version, revoked = _decode_revocations(raw)
        if version == since:
            return None
        now = time.time()
        return version, {uuid: bool(entry[0]) for uuid, entry in revoked.items() if entry[1] > now}

    # ------------------------------------------------------------------ chords

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        """Flip ChordTriggered with ``cas``: True for exactly one caller. While a Go worker
        holds the group's ``Lock`` (it is flipping the flag its own way), wait as Go does."""
        key = group_uuid.encode()
        client = self.connector.client_for(key)
        deadline = time.monotonic() + CHORD_LOCK_WAIT
        while time.monotonic() < deadline:
            raw, token = await client.gets(key)
            if raw is None or token is None:
                return False
            meta = GroupMeta.decode(raw)
            if meta.chord_triggered:
                return False
            if meta.lock:
                await asyncio.sleep(0.005)
                continue
            flipped = dataclasses.replace(meta, chord_triggered=True, lock=False)
            if await client.cas(key, flipped.encode(), token, self._expiry()):
                return True
            # Written meanwhile (a member's flip, or Go's lock): look again.
        raise TimeoutError(f"the group {group_uuid} stayed locked by a Go worker for {CHORD_LOCK_WAIT:g} s")

    async def purge_state(self, task_uuid: str) -> None:
        key = task_uuid.encode()
        await self.connector.client_for(key).delete(key)

    async def purge_group_meta(self, group_uuid: str) -> None:
        key = group_uuid.encode()
        await self.connector.client_for(key).delete(key)

    async def close(self) -> None:
        await self.connector.close()

    async def close_loop_connections(self) -> None:
        await self.connector.close()


__all__ = ["MemcacheBackend"]


def _decode_revocations(raw: bytes | None) -> tuple[int, dict[str, list[Any]]]:
    """The version and entries of the revocations key; an absent or unreadable one is empty."""
    if raw is None:
        return 0, {}
    try:
        decoded = json.loads(raw)
        return int(decoded["version"]), dict(decoded["revoked"])
    except (ValueError, KeyError, TypeError):
        return 0, {}
