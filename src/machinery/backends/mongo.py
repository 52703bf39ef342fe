"""The MongoDB result backend, in Go Machinery's database, collections and documents
(docs/wire.md §11.4; the documents themselves are built in ``_mongo_documents``).

``mongodb://`` and ``mongodb+srv://`` URLs name the server (the database comes from
``Config.mongodb.database``, ``machinery`` by default, as in Go). Finished task documents
carry ``delete_at`` and expire through Go's TTL index on it (``delete_at_1``, created here
when missing); unfinished tasks and groups do not expire, as in Go.

Where Go's chord trigger ignores the matched count of its conditional update (so every
worker that saw the group complete fires the callback), this backend requires it to be 1:
exactly one caller wins. PyMongo's asyncio client (``AsyncMongoClient``) is used, one per
event loop. MongoDB offers no notification without a replica set, so waiting re-reads with a
back-off that starts at 10 ms and settles at 0.5 s; a waiter in the writing process is woken
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient, UpdateOne
from pymongo.errors import ConnectionFailure, DuplicateKeyError, ServerSelectionTimeoutError

from .._loops import PerLoop
from ..config import Config
from ..state import COMPLETED_STATES, GroupMeta, TaskState, utcnow
from ._mongo_documents import decode_group, decode_task, group_document, state_update
from .base import Backend, PollSchedule

TASKS = "tasks"
GROUP_METAS = "group_metas"
#: Go's connect timeout.
CONNECT_TIMEOUT_MS = 10_000


def mongo_uri(url: str) -> str:
    """The URI Go dials: the URL itself, ``mongodb://`` prefixed unless it has a Mongo scheme."""
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return url
    return "mongodb://" + url


class _LoopClient:
    __slots__ = ("client", "indexed")

    def __init__(self, uri: str) -> None:
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, connectTimeoutMS=CONNECT_TIMEOUT_MS, serverSelectionTimeoutMS=CONNECT_TIMEOUT_MS, tz_aware=True
        )
        self.indexed: asyncio.Future[None] | None = None


class MongoBackend(Backend):
    """Task states in ``tasks`` and group metadata in ``group_metas``, as Go writes them."""

    connection_errors = (*Backend.connection_errors, ConnectionFailure, ServerSelectionTimeoutError)

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self._uri = mongo_uri(url)
        self._database = config.mongodb.database
        self._loops: PerLoop[_LoopClient] = PerLoop(lambda: _LoopClient(self._uri))

    def _collection(self, name: str) -> Any:
        return self._loops.get().client[self._database][name]

    async def _tasks(self) -> Any:
        """The tasks collection, once Go's TTL index on ``delete_at`` is in place."""
        bundle = self._loops.get()
        if bundle.indexed is None or (bundle.indexed.done() and bundle.indexed.exception() is not None):
            bundle.indexed = asyncio.ensure_future(self._create_index(bundle))
        await asyncio.shield(bundle.indexed)
        return bundle.client[self._database][TASKS]

    async def _create_index(self, bundle: _LoopClient) -> None:
        tasks = bundle.client[self._database][TASKS]
        await tasks.create_index([("delete_at", 1)], expireAfterSeconds=0, background=True)

    # ------------------------------------------------------------------ writes

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        # $set accumulates fields, so a later state keeps the stored created_at by itself.
        if not states:
            return
        now = utcnow()
        tasks = await self._tasks()
        updates = [
            UpdateOne({"_id": s.task_uuid}, {"$set": state_update(s, now, self.ttl)}, upsert=True) for s in states
        ]
        await tasks.bulk_write(updates, ordered=True)
        for state in states:
            if state.state in COMPLETED_STATES:
                self._waiters.notify(state.task_uuid)

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Insert the group document as Go's InitGroup does (once: a second insert is refused)."""
        document = group_document(GroupMeta(group_uuid, list(task_uuids)), utcnow())
        # A DuplicateKeyError is an at-least-once resend of the same group: it is there already.
        with contextlib.suppress(DuplicateKeyError):
            await self._collection(GROUP_METAS).insert_one(document)

    async def write_group_meta(self, meta: GroupMeta) -> None:
        document = group_document(meta, utcnow())
        del document["_id"]
        await self._collection(GROUP_METAS).update_one({"_id": meta.group_uuid}, {"$set": document}, upsert=True)

    # ------------------------------------------------------------------ reads

    async def get_state(self, task_uuid: str) -> TaskState | None:
        document = await self._collection(TASKS).find_one({"_id": task_uuid})
        return None if document is None else decode_task(document)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        found = {
            d["_id"]: decode_task(d) async for d in self._collection(TASKS).find({"_id": {"$in": list(task_uuids)}})
        }
        return [found.get(uuid) for uuid in task_uuids]  # in the order asked, which Go does not promise

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        document = await self._collection(GROUP_METAS).find_one({"_id": group_uuid})
        return None if document is None else decode_group(document)

    async def _subscribe(self, task_uuid: str) -> PollSchedule:
        return PollSchedule()

    def _poll_interval(self, handle: Any) -> float:
        return handle.next() if isinstance(handle, PollSchedule) else self.poll_interval

    # ------------------------------------------------------------------ chords

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        """Go's conditional update, won only by the caller whose update matched."""
        outcome = await self._collection(GROUP_METAS).update_one(
            {"_id": group_uuid, "chord_triggered": False}, {"$set": {"chord_triggered": True}}
        )
        return int(outcome.matched_count) == 1

    async def purge_state(self, task_uuid: str) -> None:
        await self._collection(TASKS).delete_one({"_id": task_uuid})

    async def purge_group_meta(self, group_uuid: str) -> None:
        await self._collection(GROUP_METAS).delete_one({"_id": group_uuid})

    async def close(self) -> None:
        bundle = self._loops.pop()
        if bundle is not None:
            await bundle.client.close()

    async def close_loop_connections(self) -> None:
        await self.close()


__all__ = ["MongoBackend", "mongo_uri"]
