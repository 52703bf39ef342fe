"""The Redis result backend, byte-compatible with Go Machinery's (docs/wire.md §11.1).

States live under the task UUID and group metadata under the group UUID, each written with
``SET ... EX <results_expire_in>``. Where Go does GET then SET to keep CreatedAt (two round
trips, not atomic), one Lua script does it atomically and also PUBLISHes completed states on
``machinery:done:<uuid>``, so a waiting client wakes at once instead of polling. States
written by Go workers, which publish nothing, are still found by a slower re-read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.client import PubSub

from .. import log
from .._backoff import Backoff
from .._drivers.redis import REDIS_CONNECTION_ERRORS, LuaScript, RedisConnector
from .._loops import PerLoop
from ..config import Config
from ..state import COMPLETED_STATES, GroupMeta, TaskState, WorkerInfo
from .base import Backend, decode_workers

DONE_CHANNEL = "machinery:done:"
"""Completed states are published on this prefix + the task UUID (by write_states.lua)."""
CHORD_MUTEX = "TriggerChordMutex"

_WRITE_STATES = LuaScript.load("write_states")
_TRIGGER_CHORD = LuaScript.load("trigger_chord")
_FLIP_CHORD = LuaScript.load("flip_chord")
_UNLOCK = LuaScript.load("unlock")
_WRITE_WORKER = LuaScript.load("write_worker")
_REVOKE = LuaScript.load("revoke")
_REVOCATIONS = LuaScript.load("revocations")

#: Revocations, in one hash slot: the set, the ones to stop if running, and their version.
REVOKED_KEYS = ("machinery:{revoked}", "machinery:{revoked}:terminate", "machinery:{revoked}:version")


def annotation_key(task_uuid: str, name: str) -> str:
    """Where the task's ``name`` (traceback, progress) is kept beside its state."""
    return f"machinery:{name}:{task_uuid}"


_LIVE_WORKERS = LuaScript.load("live_workers")

#: The live workers: a sorted set tag -> alive-until (ms), and a hash tag -> WorkerInfo JSON.
#: Both in one hash slot, for one script on a cluster.
WORKERS_KEY = "machinery:{workers}"
WORKERS_INFO_KEY = "machinery:{workers}:info"


class RedisBackend(Backend):
    """Task states and group metadata in Redis, in Go's keys and JSON."""

    idle_loop_ok = True  # nothing to keep up between calls

    writes_batches_atomically = True  # one script
    #: Re-read interval for states written by workers that do not publish (Go's).
    poll_interval = 0.5
    connection_errors = (*Backend.connection_errors, *REDIS_CONNECTION_ERRORS)

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.connector = RedisConnector(url, config.redis)
        self._listeners: PerLoop[_DoneListener] = PerLoop(lambda: _DoneListener(self))

    # ------------------------------------------------------------------ writes

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        keep = 1 if keep_created else 0
        keys = [s.task_uuid for s in states]
        writes = []
        # One script per hash slot: all at once off a cluster, one per task UUID on one.
        for group in self.connector.slot_groups(keys):
            args: list[Any] = [self.ttl]
            for i in group:
                args += [keep + (2 if states[i].state in COMPLETED_STATES else 0), states[i].encode()]
            writes.append(self.connector.run(_WRITE_STATES, [keys[i] for i in group], args))
        if len(writes) == 1:  # off a cluster, always: no gather to pay for
            await writes[0]
        else:
            await asyncio.gather(*writes)

    async def write_group_meta(self, meta: GroupMeta) -> None:
        await self.connector.batched().execute("SET", meta.group_uuid, meta.encode(), "EX", self.ttl)

    # ------------------------------------------------------------------ reads

    async def get_state(self, task_uuid: str) -> TaskState | None:
        raw = await self.connector.batched().execute("GET", task_uuid)
        return None if raw is None else TaskState.decode(raw)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        pipeline = self.connector.batched()
        if self.connector.cluster:  # Go's way on a cluster: pipelined GETs, never a cross-slot MGET
            raws = await asyncio.gather(*(pipeline.execute("GET", uuid) for uuid in task_uuids))
        else:
            raws = await pipeline.execute("MGET", *task_uuids)
        return [None if raw is None else TaskState.decode(raw) for raw in raws]

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        raw = await self.connector.client().get(group_uuid)
        return None if raw is None else GroupMeta.decode(raw)

    async def _subscribe(self, task_uuid: str) -> None:
        await self._listeners.get().subscribe(task_uuid)

    async def _unsubscribe(self, task_uuid: str, handle: None) -> None:
        await self._listeners.get().unsubscribe(task_uuid)

    # ------------------------------------------------------------------ beside the state

    async def write_annotation(self, task_uuid: str, name: str, value: str) -> None:
        await self.connector.batched().execute("SET", annotation_key(task_uuid, name), value, "EX", self.ttl)

    async def get_annotation(self, task_uuid: str, name: str) -> str | None:
        raw = await self.connector.batched().execute("GET", annotation_key(task_uuid, name))
        return None if raw is None else bytes(raw).decode()

    async def revoke(self, task_uuid: str, terminate: bool) -> None:
        now = int(time.time() * 1000)
        args = [now, task_uuid, now + self.ttl * 1000, "1" if terminate else "0"]
        await self.connector.run(_REVOKE, list(REVOKED_KEYS), args)

    async def revocations(self, since: int) -> tuple[int, dict[str, bool]] | None:
        reply = await self.connector.run(_REVOCATIONS, list(REVOKED_KEYS), [int(time.time() * 1000), since])
        if not reply:
            return None
        items = [bytes(item).decode() for item in reply[1:]]
        return int(reply[0]), {items[i]: items[i + 1] == "1" for i in range(0, len(items), 2)}

    # ------------------------------------------------------------------ workers

    async def write_worker(self, info: WorkerInfo, ttl: float) -> None:
        now = int(time.time() * 1000)
        args = [now, now + int(ttl * 1000), info.tag, info.encode()]
        await self.connector.run(_WRITE_WORKER, [WORKERS_KEY, WORKERS_INFO_KEY], args)

    async def forget_worker(self, tag: str) -> None:
        now = int(time.time() * 1000)
        await self.connector.run(_WRITE_WORKER, [WORKERS_KEY, WORKERS_INFO_KEY], [now, now, tag, ""])

    async def get_workers(self) -> list[WorkerInfo]:
        records = await self.connector.run(_LIVE_WORKERS, [WORKERS_KEY, WORKERS_INFO_KEY], [int(time.time() * 1000)])
        return decode_workers(records)

    # ------------------------------------------------------------------ chords

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        """Flip ChordTriggered atomically, interlocked with Go workers' ``TriggerChordMutex``.

        Retries as redsync does (32 attempts, 50-250 ms apart) while a Go worker holds it.
        """
        if not self.connector.same_slot(CHORD_MUTEX, group_uuid):
            return await self._trigger_chord_in_steps(group_uuid)
        for _ in range(32):
            outcome = int(await self.connector.run(_TRIGGER_CHORD, [CHORD_MUTEX, group_uuid], [self.ttl]))
            if outcome == -2:
                return await self._trigger_chord_under_mutex(group_uuid)
            if outcome != -3:
                return outcome == 1
            await asyncio.sleep(random.uniform(0.05, 0.25))
        raise TimeoutError(f"{CHORD_MUTEX} stayed taken; the chord of {group_uuid} was not triggered")

    async def _trigger_chord_in_steps(self, group_uuid: str) -> bool:
        """On a cluster, where ``TriggerChordMutex`` and the group are in different slots: take
        the mutex as Go does (so Go workers stay interlocked), then flip the flag with a script
        on the group's key alone, which is atomic by itself: among our workers exactly one wins
        even if the mutex were lost in a failover."""
        token = await self._take_chord_mutex(group_uuid)
        try:
            outcome = int(await self.connector.run(_FLIP_CHORD, [group_uuid], [self.ttl]))
            if outcome == -2:
                return await self._flip_by_rewrite(group_uuid)
            return outcome == 1
        finally:
            await self.connector.run(_UNLOCK, [CHORD_MUTEX], [token])

    async def _take_chord_mutex(self, group_uuid: str) -> str:
        pipeline = self.connector.batched()
        token = base64.b64encode(os.urandom(16)).decode()
        for _ in range(32):
            if await pipeline.execute("SET", CHORD_MUTEX, token, "NX", "PX", 8000):
                return token
            await asyncio.sleep(random.uniform(0.05, 0.25))
        raise TimeoutError(f"could not take {CHORD_MUTEX} to trigger the chord of {group_uuid}")

    async def _trigger_chord_under_mutex(self, group_uuid: str) -> bool:
        """Go's own way, for group metadata the script cannot edit in place."""
        token = await self._take_chord_mutex(group_uuid)
        try:
            return await self._flip_by_rewrite(group_uuid)
        finally:
            await self.connector.run(_UNLOCK, [CHORD_MUTEX], [token])

    async def _flip_by_rewrite(self, group_uuid: str) -> bool:
        """Read, flip and write back the group metadata; the caller holds the mutex."""
        meta = await self.get_group_meta(group_uuid)
        if meta is None or meta.chord_triggered:
            return False
        meta.chord_triggered = True
        await self.write_group_meta(meta)
        return True

    async def purge_state(self, task_uuid: str) -> None:
        await self.connector.client().delete(task_uuid)

    async def purge_group_meta(self, group_uuid: str) -> None:
        await self.connector.client().delete(group_uuid)

    async def close_loop_connections(self) -> None:
        await self.close()

    async def ping(self) -> None:
        await self.connector.client().ping()

    async def close(self) -> None:
        listener = self._listeners.pop()
        if listener is not None:
            await listener.close()
        await self.connector.close()


class _DoneListener:
    """One pub/sub connection per loop, wakes local waiters when a completion is published."""

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._pubsub: PubSub | None = None
        self._counts: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: dict[str, asyncio.Future[None]] = {}

    async def subscribe(self, task_uuid: str) -> None:
        count = self._counts.get(task_uuid, 0)
        self._counts[task_uuid] = count + 1
        if count:
            return
        if self._pubsub is None:
            client = self._backend.connector.client()
            if self._backend.connector.cluster:
                # A cluster's pub/sub picks its node from the slot map, loaded on first use.
                await client.initialize()
            self._pubsub = client.pubsub()
        confirmed = asyncio.get_running_loop().create_future()
        self._subscribed[DONE_CHANNEL + task_uuid] = confirmed
        try:
            await self._pubsub.subscribe(DONE_CHANNEL + task_uuid)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.ensure_future(self._read())
            # Only after the server confirms can no completion slip between subscribing and reading.
            await asyncio.wait_for(asyncio.shield(confirmed), 5)
        except Exception as exc:  # fall back to re-reading; waiting still works, just slower
            log.logger.debug("could not subscribe to completions of %s: %s", task_uuid, exc)
            if self._backend.connector.cluster and (self._reader is None or self._reader.done()):
                # The reader renews the connection (on whichever node serves the slot by then)
                # and subscribes every waiter's channel again, this one included.
                self._reader = asyncio.ensure_future(self._read())
        finally:
            self._subscribed.pop(DONE_CHANNEL + task_uuid, None)

    async def unsubscribe(self, task_uuid: str) -> None:
        count = self._counts.get(task_uuid, 0) - 1
        if count > 0:
            self._counts[task_uuid] = count
            return
        self._counts.pop(task_uuid, None)
        if self._pubsub is not None:
            try:
                await self._pubsub.unsubscribe(DONE_CHANNEL + task_uuid)
            except Exception as exc:
                log.logger.debug("unsubscribe failed: %s", exc)

    async def _read(self) -> None:
        """Hand published completions to their waiters, until nobody listens.

        While Redis is away this waits with a back-off (redis-py reconnects and subscribes
        again); once it answers, every waiter re-reads once, for the completions published
        while the channel was down. Waiters keep their own deadlines meanwhile.
        """
        assert self._pubsub is not None
        backoff = Backoff(cap=5.0, unit=0.5)
        lost = False
        while self._counts or self._subscribed:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not lost:
                    log.logger.warning(
                        "Lost the completion channel (%s: %s); waiting for Redis", type(exc).__name__, exc
                    )
                lost = True
                await asyncio.sleep(backoff.next())
                if self._backend.connector.cluster:
                    await self._renew()
                continue
            if lost:
                lost = False
                backoff.reset()
                log.logger.info("Completion channel back; %d waiter(s) look again", len(self._counts))
                for task_uuid in list(self._counts):
                    self._backend._waiters.notify(task_uuid)
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if message["type"] == "subscribe":
                confirmed = self._subscribed.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message":
                self._backend._waiters.notify(channel[len(DONE_CHANNEL) :], message["data"])

    async def _renew(self) -> None:
        """On a cluster, a pub/sub connection stays with its node, dead or alive: open a new
        one (on a node that serves the channel's slot now) and subscribe every channel again."""
        client: Any = self._backend.connector.client()
        try:
            await client.nodes_manager.initialize()  # who serves which slot now
        except Exception as exc:
            log.logger.debug("could not reload the cluster's slot map: %s", exc)
            return
        old, self._pubsub = self._pubsub, client.pubsub()
        if old is not None:
            with contextlib.suppress(Exception):
                await old.aclose()  # type: ignore[no-untyped-call]
        channels = [DONE_CHANNEL + task_uuid for task_uuid in self._counts]
        if channels:
            try:
                await self._pubsub.subscribe(*channels)
            except Exception as exc:  # the next read fails too, and renews again after a back-off
                log.logger.debug("could not subscribe to completions again: %s", exc)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
