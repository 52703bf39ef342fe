"""Batching the Redis commands of one event-loop tick into one round trip (one per node on a
cluster), and the Lua scripts those batches run."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import ReplicationError

#: Attempts of one command on a cluster, spread over a few seconds: long enough for a replica to
#: be promoted when its primary dies (cluster-node-timeout plus an election).
CLUSTER_RETRIES = 8
#: Replies worth sending again, on a fresh connection or to the node that now serves the slot.
RETRYABLE_REPLIES: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    TryAgainError,
)

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without its hiredis extra
    _hiredis_pack = None


@dataclass(frozen=True)
class LuaScript:
    """A Lua script of ``redis_lua/`` (each file's header names its KEYS, ARGV and reply)."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, *libraries: str) -> LuaScript:
        """The script ``name``, after the shared functions of each of ``libraries``."""
        folder = resources.files(__package__) / "redis_lua"
        source = "\n".join((folder / f"{part}.lua").read_text(encoding="utf-8") for part in (*libraries, name))
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


class AutoPipeline:
    """Sends the commands issued during one event-loop tick as one pipeline.

    A worker running many tasks issues a state write or an ack per task; sending each on
    its own costs a round trip and redis-py's per-command overhead. Commands queued here
    are flushed together on the next tick. Order is preserved within a flush, and a
    caller that awaits one command before issuing the next keeps its own order across
    flushes, which is all the worker relies on.
    """

    def __init__(self, client: aioredis.Redis, acknowledged: tuple[int, int] | None = None) -> None:
        self._client = client
        #: (replicas, timeout ms): each batch ends with WAIT on its connection, and counts as
        #: failed when fewer replicas confirm it (RedisConfig.min_replicas_acked).
        self._acknowledged = acknowledged
        self._pending: list[_Queued] = []
        self._flushing: set[asyncio.Future[None]] = set()
        self._kept: Any = None  # a pooled connection kept between batches (``_send_once``)

    def execute(self, *args: Any, script: LuaScript | None = None) -> asyncio.Future[Any]:
        """Queue one command (as for ``execute_command``); the future gets its reply."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            # The task's first step runs on the next loop turn, after the commands issued in
            # this one have joined the batch (one loop turn fewer than a call_soon that then
            # starts a task).
            flush = loop.create_task(self._flush_pending())
            self._flushing.add(flush)  # keep a reference until done, or the task may be collected
            flush.add_done_callback(self._flushing.discard)
        self._pending.append(_Queued(args, future, script))
        return future

    def evalsha(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a Lua script call by its SHA; the script is loaded if Redis lacks it."""
        return self.execute("EVALSHA", script.sha, len(keys), *keys, *args, script=script)

    async def _flush_pending(self) -> None:
        batch, self._pending = self._pending, []
        await self._flush(batch)

    async def _flush(self, batch: list[_Queued]) -> None:
        try:
            replies = await self._send([item.args for item in batch])
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # first use, or Redis restarted: load the scripts, resend those calls
                for script in {batch[i].script for i in missing}:
                    if script is not None:
                        await self._client.script_load(script.source)
                for i, reply in zip(missing, await self._send([batch[i].args for i in missing]), strict=True):
                    replies[i] = reply
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, reply in zip(batch, replies, strict=True):
            if not item.future.done():
                if isinstance(reply, Exception):
                    item.future.set_exception(reply)
                else:
                    item.future.set_result(reply)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Replies to ``commands``, resending those that met a broken connection or a cluster
        in mid-failover a few times. Should a first attempt have run, the resend repeats it:
        at-least-once. What still fails is the caller's to retry (the worker persists)."""
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        delay = 0.05
        for attempt in range(self.attempts):
            try:
                got = await self._send_once([commands[i] for i in todo])
            except RETRYABLE_REPLIES as exc:
                got = [exc] * len(todo)
            for i, reply in zip(todo, got, strict=True):
                replies[i] = reply
            todo = [i for i in todo if isinstance(replies[i], RETRYABLE_REPLIES)]
            if not todo:
                break
            if attempt:  # the first resend goes at once: a pooled connection to a restarted server
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        return replies

    #: How many times one batch is sent before its failures go back to the callers.
    attempts = 2

    async def _send_once(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        # Straight on a pooled connection: redis-py's Pipeline object costs more than the
        # round trip it saves, and the replies need no parsing beyond RESP. The last batch's
        # connection stays checked out for the next one: redis-py's checkout and release (a
        # lock, connection-count records, an event) cost a lone command as much as its round
        # trip. Closing the client disconnects it with the pool's others.
        pool = self._client.connection_pool
        connection, self._kept = self._kept, None
        if connection is None:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            replies = await self._exchange(connection, commands)
        except BaseException:
            await connection.disconnect()  # a half-read connection must not be used again
            await pool.release(connection)
            raise
        if self._kept is None:
            self._kept = connection
        else:  # another batch kept its own meanwhile
            await pool.release(connection)
        return replies

    async def _exchange(self, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` on ``connection`` and read a reply (or error reply) for each.

        With ``min_replicas_acked``, a ``WAIT`` follows them, and the replies it does not
        confirm become a ``ReplicationError``. A failure midway leaves the connection half-read:
        the caller disconnects it."""
        sent = commands if self._acknowledged is None else [*commands, ("WAIT", *self._acknowledged)]
        await connection.send_packed_command(_pack(connection, sent), check_health=False)
        replies: list[Any] = []
        for _ in sent:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        if self._acknowledged is not None:
            confirmed = replies.pop()
            if not isinstance(confirmed, int) or confirmed < self._acknowledged[0]:
                failure = replication_error(confirmed, *self._acknowledged)
                replies = [reply if isinstance(reply, Exception) else failure for reply in replies]
        return replies


class ClusterAutoPipeline(AutoPipeline):
    """The auto-pipeline on a cluster: a tick's commands split by the node that serves each
    key's slot, sent raw (hiredis-packed) on one connection per node, all nodes at once.

    A reply that redirects (``MOVED`` after a failover or a slot migration, ``ASK`` during
    one) is sent again through redis-py's cluster client, which follows it and updates the
    slot map; a node that cannot be reached makes the next attempt reload the map first.
    """

    attempts = CLUSTER_RETRIES

    def __init__(self, client: Any, acknowledged: tuple[int, int] | None = None) -> None:
        super().__init__(client, acknowledged)
        self._reload = False

    async def _send_once(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        cluster: Any = self._client
        replies: list[Any] = [None] * len(commands)
        try:
            if self._reload:
                self._reload = False
                await cluster.nodes_manager.initialize()  # ask the live nodes who serves what now
            else:
                await cluster.initialize()  # the slot map, loaded once
        except (RedisError, OSError) as exc:
            self._reload = True
            return [exc] * len(commands)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, command in enumerate(commands):
            key = _first_key(command)
            try:
                node = (
                    cluster.get_default_node()
                    if key is None
                    else cluster.nodes_manager.get_node_from_slot(key_slot(key))
                )
            except (KeyError, IndexError, RedisError):  # no primary for that slot right now
                self._reload = True
                replies[i] = ClusterDownError("the slot has no primary right now; retrying")
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        outcomes = await asyncio.gather(
            *(self._send_to_node(node, [commands[i] for i in indices]) for node, indices in groups.values()),
            return_exceptions=True,
        )
        for (_, indices), outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                self._reload = True
                outcome = [outcome] * len(indices)
            for i, reply in zip(indices, outcome, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, AskError):  # MOVED too: redis-py follows it and learns the new map
                try:
                    replies[i] = await cluster.execute_command(*commands[i])
                except Exception as exc:
                    replies[i] = exc
        return replies

    async def _send_to_node(self, node: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        connection = node.acquire_connection()
        try:
            return await self._exchange(connection, commands)
        except BaseException:
            await connection.disconnect()  # a half-read connection must not be reused
            raise
        finally:
            node.release(connection)


def _first_key(command: tuple[Any, ...]) -> bytes | None:
    """The key a command of ours is routed by: its first argument, or EVALSHA's first key."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        if int(command[2]) == 0:
            return None
        key = command[3]
    elif len(command) > 1:
        key = command[1]
    else:
        return None
    return key if isinstance(key, bytes) else str(key).encode()


def replication_error(confirmed: Any, replicas: int, timeout_ms: int) -> ReplicationError:
    """The failure of a batch too few replicas confirmed."""
    if isinstance(confirmed, Exception):
        return ReplicationError(f"Redis could not wait for replicas ({confirmed}); the writes are retried")
    return ReplicationError(
        f"only {confirmed} of the {replicas} replica(s) RedisConfig.min_replicas_acked asks for confirmed "
        f"a write within {timeout_ms} ms; the writes are retried (check the replicas, or lower the setting)"
    )


def _pack(connection: Any, commands: list[tuple[Any, ...]]) -> Any:
    """RESP bytes for ``commands``: hiredis's C packer if present (redis-py's asyncio
    connections pack in Python, which costs more than the round trip on a busy worker)."""
    if _hiredis_pack is not None:
        return b"".join([_hiredis_pack(command) for command in commands])
    return connection.pack_commands(commands)


@dataclass(slots=True)
class _Queued:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    script: LuaScript | None
