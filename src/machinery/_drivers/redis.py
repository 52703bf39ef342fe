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
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._loops import PerLoop
from ..config import RedisConfig
from ..errors import ConfigError

#: What an unreachable Redis looks like in redis-py's exceptions (they are not builtin ConnectionErrors).
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

#: Attempts of one command on a connection that broke (a pooled connection to a server that has
#: restarted fails once before redis-py notices), with a short jittered back-off.
COMMAND_RETRIES = 3

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without its hiredis extra
    _hiredis_pack = None


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    socket_path: str | None = None
    tls: bool = False


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user:]password@]host[:port][/db]``, ``rediss://...`` (TLS) and
    ``redis+socket://[password@]/path.sock[:/db]``. A single userinfo word is the password, as in Go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    username = password = None
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            user, _, secret = userinfo.partition(":")
            username, password = unquote(user) or None, unquote(secret)
        else:
            password = unquote(userinfo)
    if scheme == "redis+socket":
        path, db = parts.path, 0
        if ":/" in path:
            path, _, db_text = path.rpartition(":/")
            db = _db(db_text, url)
        if not path:
            raise ConfigError(f"redis+socket URL {url!r} has no socket path")
        return RedisAddress(db=db, username=username, password=password, socket_path=path)
    if scheme not in ("redis", "rediss"):
        raise ConfigError(f"{url!r} is not a redis://, rediss:// or redis+socket:// URL")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"Redis URL {url!r} has an invalid port") from None
    db = _db(parts.path.strip("/"), url) if parts.path.strip("/") else 0
    return RedisAddress(parts.hostname or "127.0.0.1", port, db, username, password, None, scheme == "rediss")


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"Redis URL {url!r}: database {text!r} must be a number")
    return int(text)


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
    """The running loop's client and its auto-pipeline."""

    __slots__ = ("client", "pipeline")

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pipeline = AutoPipeline(client)


class RedisConnector:
    """Hands out a ``redis.asyncio.Redis`` for the running event loop, all from one URL."""

    def __init__(self, url: str, config: RedisConfig) -> None:
        if config.cluster_enabled or config.master_name or "," in url.partition("://")[2].partition("/")[0]:
            # Better refused than quietly run against one node the user did not mean.
            raise ConfigError(
                f"Redis Cluster and Sentinel are not supported yet (redis.cluster_enabled, redis.master_name, "
                f"or several hosts in {url!r}); point machinery at a single Redis server"
            )
        self.url = url
        self.address = parse_redis_url(url)
        self._config = config
        self._loops: PerLoop[_LoopClient] = PerLoop(lambda: _LoopClient(self._create()))

    def same_server(self, other: object) -> bool:
        """Whether ``other`` is a connector to this same Redis server and database."""
        return isinstance(other, RedisConnector) and other.address == self.address

    def batched(self) -> AutoPipeline:
        """The running loop's auto-pipeline: commands issued in one loop tick share a round trip."""
        return self._loops.get().pipeline

    def run(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Run ``script`` (EVALSHA, loading it on a miss) in the running loop's auto-pipeline."""
        return self._loops.get().pipeline.evalsha(script, keys, args)

    def client(self) -> aioredis.Redis:
        """The client for the running loop (created on first use)."""
        return self._loops.get().client

    def _create(self) -> aioredis.Redis:
        a, c = self.address, self._config
        options: dict[str, Any] = {
            "db": a.db,
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
        if a.socket_path:
            pool = aioredis.ConnectionPool(
                connection_class=aioredis.UnixDomainSocketConnection, path=a.socket_path, **options
            )
        else:
            extra: dict[str, Any] = {}
            if a.tls:
                extra = {"connection_class": aioredis.SSLConnection, "ssl_cert_reqs": ssl.CERT_REQUIRED}
            pool = aioredis.ConnectionPool(host=a.host, port=a.port, **options, **extra)
        return aioredis.Redis(connection_pool=pool)

    async def close(self) -> None:
        """Close the running loop's client; clients of other loops are theirs to close."""
        bundle = self._loops.pop()
        if bundle is not None:
            await bundle.client.aclose(close_connection_pool=True)  # we built the pool, so we close it


class AutoPipeline:
    """Sends the commands issued during one event-loop tick as one pipeline.

    A worker running many tasks issues a state write or an ack per task; sending each on
    its own costs a round trip and redis-py's per-command overhead. Commands queued here
    are flushed together on the next tick. Order is preserved within a flush, and a
    caller that awaits one command before issuing the next keeps its own order across
    flushes, which is all the worker relies on.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pending: list[_Queued] = []
        self._flushing: set[asyncio.Future[None]] = set()

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
        try:
            return await self._send_once(commands)
        except (RedisConnectionError, OSError):
            # A pooled connection may have died with a restarted server; try a fresh one
            # once. Should the first attempt have run, this repeats it: at-least-once.
            return await self._send_once(commands)

    async def _send_once(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        # Straight on a pooled connection: redis-py's Pipeline object costs more than the
        # round trip it saves, and the replies need no parsing beyond RESP.
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(_pack(connection, commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect()  # a half-read connection must not go back to the pool
            raise
        finally:
            await pool.release(connection)


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
