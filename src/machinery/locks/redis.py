"""The Redis lock: Go Machinery's ``locks/redis`` semantics (docs/wire.md §12) in one atomic script.

Go stores the deadline (Unix ns, decimal) under the key with ``SET NX`` and a TTL that ends
at the deadline; when the key exists it takes it over (``GETSET``) only if the stored
deadline has passed. The script below does the same steps in one round trip (``redis_lua/try_lock.lua``), atomically, on
the same key and value, so Go and Python schedulers of one periodic entry share its ticks.
"""

from __future__ import annotations

from .._drivers.redis import LuaScript, RedisConnector
from ..config import Config
from .base import Lock, now_ns

_TRY_LOCK = LuaScript.load("try_lock")
_CLAIM = LuaScript.load("claim")
_UNLOCK = LuaScript.load("unlock")
_TAKE_TURN = LuaScript.load("take_turn")


class RedisLock(Lock):
    """A lock key in Redis holding its deadline, as Go's go-redis lock writes it."""

    def __init__(self, config: Config, url: str) -> None:
        super().__init__(config, url)
        self.connector = RedisConnector(url, config.redis)

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        now = now_ns()
        # Go: TTL = deadline + 1 - now, so the key disappears when the deadline passes.
        ttl_ms = max(1, (deadline_ns + 1 - now) // 1_000_000)
        taken = await self.connector.run(_TRY_LOCK, [key], [str(deadline_ns), str(now), ttl_ms])
        return bool(int(taken))

    async def claim(self, key: str, value: str, seconds: float) -> str | None:
        held = await self.connector.run(_CLAIM, [key], [value, max(1, int(seconds * 1000))])
        return None if not held else bytes(held).decode()

    async def release(self, key: str, value: str) -> bool:
        return bool(await self.connector.run(_UNLOCK, [key], [value]))

    async def take_turn(self, key: str, interval: float, burst: int) -> float:
        wait_us = await self.connector.run(_TAKE_TURN, [key], [max(1, int(interval * 1e6)), max(1, burst)])
        return int(wait_us) / 1e6

    async def close(self) -> None:
        await self.connector.close()

    async def close_loop_connections(self) -> None:
        await self.connector.close()
