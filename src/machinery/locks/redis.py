"""The Redis lock: Go Machinery's ``locks/redis`` semantics (WIRE.md 12) in one atomic script.

Go stores the deadline (Unix ns, decimal) under the key with ``SET NX`` and a TTL that ends
at the deadline; when the key exists it takes it over (``GETSET``) only if the stored
deadline has passed. The script below does the same steps in one round trip, atomically, on
the same key and value, so Go and Python schedulers of one periodic entry share its ticks.
"""

from __future__ import annotations

from ..config import Config
from .base import Lock, now_ns

# KEYS[1] = key; ARGV = deadline (Unix ns), now (Unix ns), TTL (ms). 1 = taken, 0 = held.
# Deadlines are compared as decimal strings: Lua numbers are doubles, and Unix nanoseconds
# are beyond 2^53, so tonumber() would round them.
_TRY_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[3]) then return 1 end
local held = redis.call('GET', KEYS[1])
local now = ARGV[2]
if held and string.match(held, '^[1-9]%d*$') and (#now > #held or (#now == #held and now > held)) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""


class RedisLock(Lock):
    """A lock key in Redis holding its deadline, as Go's go-redis lock writes it."""

    def __init__(self, config: Config, url: str) -> None:
        from .._redis import RedisConnector  # imported here: redis is an optional dependency

        super().__init__(config, url)
        self.connector = RedisConnector(url, config.redis)

    async def try_lock(self, key: str, deadline_ns: int) -> bool:
        now = now_ns()
        # Go: TTL = deadline + 1 - now, so the key disappears when the deadline passes.
        ttl_ms = max(1, (deadline_ns + 1 - now) // 1_000_000)
        taken = await self.connector.script(_TRY_LOCK)(keys=[key], args=[str(deadline_ns), str(now), ttl_ms])
        return bool(int(taken))

    async def aclose(self) -> None:
        await self.connector.aclose()

    async def aclose_loop_connections(self) -> None:
        await self.connector.aclose()
