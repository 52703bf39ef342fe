"""One Redis connection setup for the broker, backend and lock: URL parsing and a client per loop.

asyncio connections belong to the event loop that opened them, and machinery runs on
several loops (a worker's, the sync face's, an application's), so each loop gets its own
client from the same settings.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from .config import RedisConfig
from .errors import ConfigError


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


class RedisConnector:
    """Hands out a ``redis.asyncio.Redis`` for the running event loop, all from one URL."""

    def __init__(self, url: str, config: RedisConfig) -> None:
        self.url = url
        self.address = parse_redis_url(url)
        self._config = config
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._scripts: weakref.WeakKeyDictionary[aioredis.Redis, dict[str, AsyncScript]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def script(self, source: str) -> AsyncScript:
        """``source`` registered on the running loop's client (EVALSHA, falling back to EVAL)."""
        client = self.client()
        scripts = self._scripts.get(client)
        if scripts is None:
            scripts = self._scripts[client] = {}
        script = scripts.get(source)
        if script is None:
            script = scripts[source] = client.register_script(source)
        return script

    def client(self) -> aioredis.Redis:
        """The client for the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._lock:
                client = self._clients.get(loop)
                if client is None:
                    client = self._clients[loop] = self._create()
        return client

    def _create(self) -> aioredis.Redis:
        a, c = self.address, self._config
        options: dict[str, Any] = {
            "db": a.db,
            "username": a.username,
            "password": a.password,
            "socket_timeout": None,  # blocking commands carry their own timeouts
            "socket_connect_timeout": c.connect_timeout or None,
            "client_name": c.client_name or None,
            "max_connections": c.max_active or None,
            "health_check_interval": 10,
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

    async def aclose(self) -> None:
        """Close the running loop's client (other loops close theirs when they end)."""
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()
