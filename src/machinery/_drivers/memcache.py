"""Memcached connection plumbing: Go's ``memcache://h1:p1,h2:p2`` URLs, gomemcache's choice of
server for a key, and a client per event loop (asyncio connections belong to their loop)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiomcache

from .._loops import PerLoop
from ..errors import ConfigError

DEFAULT_PORT = 11211
#: Connections per server and loop: a worker's state writes and a client's polls share them.
POOL_SIZE = 8


def parse_memcache_url(url: str) -> list[tuple[str, int]]:
    """The servers of ``memcache://host1:port1[,host2:port2,...]``, in order (the order picks
    the server of each key, so every peer must list them alike)."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "memcache" or not sep:
        raise ConfigError(f"{url!r} is not a memcache://host:port[,host:port...] URL")
    servers = []
    for item in rest.partition("/")[0].split(","):
        item = item.strip()
        if not item:
            continue
        try:
            parts = urlsplit(f"//{item}")
            servers.append((parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT))
        except ValueError:
            raise ConfigError(f"memcache URL {url!r} has an invalid server {item!r}") from None
    if not servers:
        raise ConfigError(f"memcache URL {url!r} names no server")
    return servers


def pick_server(key: bytes, count: int) -> int:
    """The index of the server holding ``key``, as gomemcache's ServerList picks it
    (CRC-32/IEEE of the key modulo the number of servers), so Go and Python share a pool."""
    return 0 if count == 1 else zlib.crc32(key) % count


class MemcacheConnector:
    """One ``aiomcache.Client`` per server, per event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.servers = parse_memcache_url(url)
        self._loops: PerLoop[list[aiomcache.Client]] = PerLoop(
            lambda: [aiomcache.Client(host, port, pool_size=POOL_SIZE) for host, port in self.servers]
        )

    def client_for(self, key: bytes) -> aiomcache.Client:
        """The running loop's client of the server that holds ``key``."""
        clients = self._loops.get()
        return clients[pick_server(key, len(clients))]

    def by_server(self, keys: Sequence[bytes]) -> list[tuple[aiomcache.Client, list[int]]]:
        """The indices of ``keys`` grouped by the client of their server."""
        clients = self._loops.get()
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(pick_server(key, len(clients)), []).append(i)
        return [(clients[server], indices) for server, indices in groups.items()]

    async def close(self) -> None:
        """Close the running loop's clients."""
        clients = self._loops.pop()
        for client in clients or ():
            await client.close()
