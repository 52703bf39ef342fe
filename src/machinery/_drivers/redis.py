"""One Redis connection setup for the broker, backend and lock: URL parsing, a client per loop,
the auto-pipeline that batches the commands of one loop tick, and the Lua scripts.

asyncio connections belong to the event loop that opened them, and machinery runs on
several loops (a worker's, the sync face's, an application's), so each loop gets its own
client from the same settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, NoScriptError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._loops import PerLoop
from ..config import RedisConfig
from ..errors import ConfigError, ReplicationError

#: What an unreachable Redis looks like in redis-py's exceptions (they are not builtin ConnectionErrors).
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

#: Attempts of one command on a connection that broke (a pooled connection to a server that has
#: restarted fails once before redis-py notices), with a short jittered back-off.
COMMAND_RETRIES = 3
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


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to reach Redis: one server, the Sentinels of one, or a cluster's seeds."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    socket_path: str | None = None
    tls: bool = False
    #: Every ``host:port`` of the URL, in order (``(host, port)`` alone for one server).
    nodes: tuple[tuple[str, int], ...] = ()


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user:]password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``redis+socket://[password@]/path.sock[:/db]``, and Go's several comma-separated hosts
    ``redis://[[user:]password@]h1:p1,h2:p2[/db]`` (credentials from the first, as in Go).
    A single userinfo word is the password, as in Go."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"{url!r} is not a redis://, rediss:// or redis+socket:// URL")
    username = password = None
    if scheme == "redis+socket":
        parts = urlsplit(url)
        if "@" in parts.netloc:
            username, password = _userinfo(parts.netloc.rsplit("@", 1)[0])
        path, db = parts.path, 0
        if ":/" in path:
            path, _, db_text = path.rpartition(":/")
            db = _db(db_text, url)
        if not path:
            raise ConfigError(f"redis+socket URL {url!r} has no socket path")
        return RedisAddress(db=db, username=username, password=password, socket_path=path)
    if scheme not in ("redis", "rediss"):
        raise ConfigError(f"{url!r} is not a redis://, rediss:// or redis+socket:// URL")
    hosts, _, path = rest.partition("/")
    path = path.partition("?")[0]
    if "@" in hosts:
        userinfo, _, hosts = hosts.rpartition("@")
        username, password = _userinfo(userinfo)
    nodes = tuple(_host_port(item.strip(), url) for item in hosts.split(",") if item.strip())
    if not nodes:
        nodes = (("127.0.0.1", 6379),)
    db = _db(path.strip("/"), url) if path.strip("/") else 0
    host, port = nodes[0]
    return RedisAddress(host, port, db, username, password, None, scheme == "rediss", nodes)


def _userinfo(userinfo: str) -> tuple[str | None, str]:
    if ":" in userinfo:
        user, _, secret = userinfo.partition(":")
        return unquote(user) or None, unquote(secret)
    return None, unquote(userinfo)


def _host_port(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, _, port_text = item[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if port_text and not port_text.isdigit():
        raise ConfigError(f"Redis URL {url!r} has an invalid port in {item!r}")
    return host or "127.0.0.1", int(port_text) if port_text else 6379


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"Redis URL {url!r}: database {text!r} must be a number")
    return int(text)


def topology(address: RedisAddress, config: RedisConfig) -> str:
    """``cluster``, ``sentinel`` or ``single``, chosen as Go's go-redis client is (WIRE.md §9.9):
    ``cluster_enabled`` first, then ``master_name`` (the hosts are Sentinels), then several
    hosts (a cluster), else one server."""
    if address.socket_path:
        if config.cluster_enabled or config.master_name:
            raise ConfigError("redis+socket:// reaches one server; it cannot be a cluster or a Sentinel setup")
        return "single"
    if config.cluster_enabled:
        return "cluster"
    if config.master_name:
        return "sentinel"
    return "cluster" if len(address.nodes) > 1 else "single"


def slot_tag(key: str) -> str:
    """What to put between braces in a key of ours so that it lands in ``key``'s hash slot.

    Go's keys carry no hash tag, so their slot is that of the whole name; a key of ours that
    embeds ``{<name>}`` hashes the same. A name with a tag of its own hashes by that tag.
    """
    opening = key.find("{")
    if opening >= 0:
        closing = key.find("}", opening + 1)
        if closing > opening + 1:
            return key[opening + 1 : closing]
    return key


def tagged(prefix: str, key: str, suffix: str = "", strict: bool = False) -> str:
    """``prefix{tag}suffix``, in the hash slot of ``key`` (see :func:`slot_tag`).

    With ``strict`` (on a cluster), raises ConfigError for a name no tag can follow (a ``}``
    before any ``{``, which Redis reads as part of the name but which would end our tag early)."""
    tag = slot_tag(key)
    if strict and "}" in tag:
        raise ConfigError(
            f"the Redis key {key!r} contains '}}' outside a hash tag; machinery cannot keep its "
            f"own keys for it in the same cluster slot: rename the queue"
        )
    return f"{prefix}{{{tag}}}{suffix}"


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


class _LoopClient:
    """The running loop's client, its auto-pipeline, and what else to close with them."""

    __slots__ = ("client", "others", "pipeline")

    def __init__(self, client: Any, cluster: bool, config: RedisConfig, others: Sequence[aioredis.Redis] = ()) -> None:
        self.client = client
        acknowledged = (config.min_replicas_acked, max(1, config.replicas_ack_timeout))
        pipeline = ClusterAutoPipeline if cluster else AutoPipeline
        self.pipeline: AutoPipeline = pipeline(client, acknowledged if config.min_replicas_acked > 0 else None)
        self.others = list(others)


class RedisConnector:
    """Hands out a Redis client for the running event loop, all from one URL.

    The topology is a connection concern only: a single server, a Sentinel-managed primary
    (the client asks the Sentinels where the primary is, and again after a failover), or a
    cluster (the client follows the slot map, MOVED/ASK redirects and replica promotions).
    Drivers name their keys with :meth:`tag` and group multi-key work with
    :meth:`slot_groups`, so that every script touches one hash slot on a cluster.
    """

    def __init__(self, url: str, config: RedisConfig) -> None:
        self.url = url
        self.address = parse_redis_url(url)
        self.topology = topology(self.address, config)
        #: Keys in different hash slots cannot share a script or a transaction.
        self.cluster = self.topology == "cluster"
        self._config = config
        self._loops: PerLoop[_LoopClient] = PerLoop(self._create)

    def tag(self, prefix: str, key: str, suffix: str = "") -> str:
        """A key of ours in ``key``'s hash slot (see :func:`tagged`); strict on a cluster."""
        return tagged(prefix, key, suffix, strict=self.cluster)

    def same_slot(self, *keys: str) -> bool:
        """Whether one script may touch all of ``keys``: always off a cluster."""
        return not self.cluster or len({key_slot(key.encode()) for key in keys}) <= 1

    def slot_groups(self, keys: Sequence[str]) -> list[list[int]]:
        """The indices of ``keys`` grouped by hash slot, in order: one group off a cluster."""
        if not keys:
            return []
        if not self.cluster:
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        return list(groups.values())

    def batched(self) -> AutoPipeline:
        """The running loop's auto-pipeline: commands issued in one loop tick share a round trip
        (one per node on a cluster)."""
        return self._loops.get().pipeline

    def run(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Run ``script`` (EVALSHA, loading it on a miss) in the running loop's auto-pipeline."""
        return self._loops.get().pipeline.evalsha(script, keys, args)

    def client(self) -> aioredis.Redis:
        """The client for the running loop (created on first use). On a cluster this is a
        ``RedisCluster``, which offers the same single-key commands and routes each by slot."""
        client: aioredis.Redis = self._loops.get().client
        return client

    def _options(self) -> dict[str, Any]:
        a, c = self.address, self._config
        return {
            "username": a.username,
            "password": a.password,
            "socket_timeout": None,  # blocking commands carry their own timeouts
            "socket_connect_timeout": c.connect_timeout or None,
            "client_name": c.client_name or None,
            # 0 means unlimited in Go's config; redis-py would quietly cap None at 100.
            "max_connections": c.max_active or 10_000,
            "health_check_interval": 10,
            # Without these, the pool's connections never retry: the first call on each stale
            # one after a restart would fail. (At-least-once: a retried write may run twice.)
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), COMMAND_RETRIES),
            "retry_on_error": list(REDIS_CONNECTION_ERRORS),
        }

    def _create(self) -> _LoopClient:
        a, c = self.address, self._config
        options = self._options()
        if self.topology == "cluster":
            options.pop("retry_on_error")
            # Retries span a primary's failover: the client reloads the slot map between them.
            options["retry"] = Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), CLUSTER_RETRIES)
            tls: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED} if a.tls else {}
            cluster = aioredis.RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in a.nodes], **options, **tls
            )
            return _LoopClient(cluster, True, c)
        options["db"] = a.db
        if self.topology == "sentinel":
            tls = {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED} if a.tls else {}
            sentinel = aioredis.Sentinel(  # type: ignore[no-untyped-call]
                list(a.nodes),
                sentinel_kwargs={
                    "password": c.sentinel_password or None,
                    "socket_connect_timeout": c.connect_timeout or None,
                    # Each question goes to the next Sentinel on failure; retrying one Sentinel
                    # (redis-py's default) makes a wrong password take many seconds to report.
                    "retry": Retry(NoBackoff(), 0),
                    **tls,
                },
            )
            primary = sentinel.master_for(c.master_name, redis_class=aioredis.Redis, **options, **tls)
            return _LoopClient(primary, False, c, others=sentinel.sentinels)
        if a.socket_path:
            pool = aioredis.ConnectionPool(
                connection_class=aioredis.UnixDomainSocketConnection, path=a.socket_path, **options
            )
        else:
            extra: dict[str, Any] = {}
            if a.tls:
                extra = {"connection_class": aioredis.SSLConnection, "ssl_cert_reqs": ssl.CERT_REQUIRED}
            pool = aioredis.ConnectionPool(host=a.host, port=a.port, **options, **extra)
        return _LoopClient(aioredis.Redis(connection_pool=pool), False, c)

    async def close(self) -> None:
        """Close the running loop's client; clients of other loops are theirs to close."""
        bundle = self._loops.pop()
        if bundle is None:
            return
        if isinstance(bundle.client, aioredis.RedisCluster):
            await bundle.client.aclose()
        else:
            await bundle.client.aclose(close_connection_pool=True)  # we built the pool, so we close it
        for other in bundle.others:
            await other.aclose()


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

    def execute(self, *args: Any, script: LuaScript | None = None) -> asyncio.Future[Any]:
        """Queue one command (as for ``execute_command``); the future gets its reply."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush_soon)
        self._pending.append(_Queued(args, future, script))
        return future

    def evalsha(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a Lua script call by its SHA; the script is loaded if Redis lacks it."""
        return self.execute("EVALSHA", script.sha, len(keys), *keys, *args, script=script)

    def _flush_soon(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            flush = asyncio.ensure_future(self._flush(batch))
            self._flushing.add(flush)  # keep a reference until done, or the task may be collected
            flush.add_done_callback(self._flushing.discard)

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
        # round trip it saves, and the replies need no parsing beyond RESP.
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        sent = commands if self._acknowledged is None else [*commands, ("WAIT", *self._acknowledged)]
        try:
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
                    replies = [failure] * len(replies)
            return replies
        except BaseException:
            await connection.disconnect()  # a half-read connection must not go back to the pool
            raise
        finally:
            await pool.release(connection)


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
        sent = commands if self._acknowledged is None else [*commands, ("WAIT", *self._acknowledged)]
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(_pack(connection, sent), check_health=False)
            replies: list[Any] = []
            for _ in sent:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            await connection.disconnect()  # a half-read connection must not be reused
            raise
        finally:
            node.release(connection)
        if self._acknowledged is not None:
            confirmed = replies.pop()
            if not isinstance(confirmed, int) or confirmed < self._acknowledged[0]:
                failure = replication_error(confirmed, *self._acknowledged)
                replies = [reply if isinstance(reply, Exception) else failure for reply in replies]
        return replies


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
