"""One Redis connection setup for the broker, backend and lock: Go's URL forms, the topology
(one server, Sentinel, cluster), hash-tagged key names, and a client per loop with its
auto-pipeline (``redis_pipeline``).

asyncio connections belong to the event loop that opened them, and machinery runs on
several loops (a worker's, the sync face's, an application's), so each loop gets its own
client from the same settings.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._loops import PerLoop
from ..config import RedisConfig
from ..errors import ConfigError
from .redis_pipeline import CLUSTER_RETRIES, AutoPipeline, ClusterAutoPipeline, LuaScript

#: What an unreachable Redis looks like in redis-py's exceptions (they are not builtin ConnectionErrors).
REDIS_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

#: Attempts of one command on a connection that broke (a pooled connection to a server that has
#: restarted fails once before redis-py notices), with a short jittered back-off.
COMMAND_RETRIES = 3


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

    def same_server(self, other: object) -> bool:
        """Whether ``other`` is a connector to this same Redis server and database, so that one
        script may write through both (never on a cluster: their keys are in different slots)."""
        return isinstance(other, RedisConnector) and not self.cluster and other.address == self.address

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


__all__ = [
    "COMMAND_RETRIES",
    "REDIS_CONNECTION_ERRORS",
    "AutoPipeline",
    "LuaScript",
    "RedisAddress",
    "RedisConnector",
    "parse_redis_url",
    "slot_tag",
    "tagged",
    "topology",
]
