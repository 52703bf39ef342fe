"""Moves between Go's ``delayed_tasks`` set and a queue on a Redis Cluster, in steps.

Go's key layout puts ``delayed_tasks`` and each queue list in unrelated hash slots (Go uses no
hash tags, and renaming them would cut Go peers off), so on a cluster no script can touch both.
Off a cluster, ``defer.lua`` and ``move_due.lua`` do each move atomically; on one, these steps
keep the at-least-once promise instead: each step writes the message's new place before it
removes the old one, so a crash between steps leaves a duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import msgspec

from .._drivers.redis import LuaScript, RedisConnector

#: How long a mover holds the due messages it leased before another mover may take them again.
LEASE_SECONDS = 60.0

_LEASE_DUE = LuaScript.load("lease_due")
_REMOVE_LEASED = LuaScript.load("remove_leased")
_PUSH_PRIORITIZED = LuaScript.load("push_prioritized", "priority")
_decoder = msgspec.json.Decoder()


async def defer_in_steps(connector: RedisConnector, processing: str, delayed_key: str, body: bytes, due: int) -> None:
    """Give a taken message back for later: add it to the delayed set, then remove it from the
    processing list. Should a reaper have returned it to the queue meanwhile (it was no longer
    in the processing list), the deferred copy is taken back out."""
    pipeline = connector.batched()
    await pipeline.execute("ZADD", delayed_key, due, body)
    if not int(await pipeline.execute("LREM", processing, 1, body)):
        await pipeline.execute("ZREM", delayed_key, body)


async def move_due_in_steps(
    connector: RedisConnector, delayed_key: str, now_ns: int, batch: int, default_queue: str
) -> tuple[int, Any]:
    """Lease due messages (one script on the delayed set), push each to the queue its
    RoutingKey names (by priority, as ``move_due.lua`` does), then remove them from the set.
    Returns (how many moved, the score of the next delayed message or None)."""
    lease_until = now_ns + int(LEASE_SECONDS * 1e9)
    leased, next_score = await connector.run(_LEASE_DUE, [delayed_key], [now_ns, batch, lease_until])
    if not leased:
        return 0, next_score
    plain: dict[str, list[bytes]] = defaultdict(list)
    prioritized: dict[str, list[Any]] = defaultdict(list)
    for message in leased:
        queue, priority = route(message, default_queue)
        if priority > 0:
            prioritized[queue] += (priority, message)
        else:
            plain[queue].append(message)
    pipeline = connector.batched()
    await asyncio.gather(
        *(pipeline.execute("RPUSH", queue, *bodies) for queue, bodies in plain.items()),
        *(connector.run(_PUSH_PRIORITIZED, [queue], args) for queue, args in prioritized.items()),
    )
    # Only what still holds our lease: a message already run and deferred again is back in the
    # set under a new score, and removing it would lose it.
    await connector.run(_REMOVE_LEASED, [delayed_key], [lease_until, *leased])
    if next_score is not None and float(next_score) >= lease_until:
        next_score = None  # only our own lease is left: nothing else is due before the next poll
    return len(leased), next_score


def route(message: bytes, default_queue: str) -> tuple[str, int]:
    """The queue and priority (0-9) of a delayed message, read as ``move_due.lua`` reads them:
    its RoutingKey (matched case-insensitively, as Go does), else ``default_queue``."""
    try:
        decoded = _decoder.decode(message)
    except msgspec.DecodeError:
        return default_queue, 0
    if not isinstance(decoded, dict):
        return default_queue, 0
    key = decoded.get("RoutingKey")
    if key is None:
        key = next((value for name, value in decoded.items() if name.lower() == "routingkey"), None)
    queue = key if isinstance(key, str) and key else default_queue
    value = decoded.get("Priority")
    priority = 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        priority = int(min(value, 9)) if value >= 1 else 0
    return queue, priority


__all__ = ["LEASE_SECONDS", "defer_in_steps", "move_due_in_steps", "route"]
