"""The lock contract (locks/base.py) on every lock: Go's deadline lock, claims, rate-limit turns."""

from __future__ import annotations

import asyncio
import time

from support.deployment import Deployment

MINUTE_NS = 60 * 10**9


async def test_the_first_taker_wins_until_the_deadline(lock_deployment: Deployment) -> None:
    d = lock_deployment
    server = d.server()
    lock, key = server.lock, f"{d.queue}_lock"
    later = time.time_ns() + MINUTE_NS
    assert await lock.try_lock(key, later)
    assert not await lock.try_lock(key, later)
    assert not await lock.lock(key, later, retries=3)
    other = d.server().lock  # another process's view of the same lock
    assert not await other.try_lock(key, later)
    await server.aclose()


async def test_a_passed_deadline_can_be_taken_again(lock_deployment: Deployment) -> None:
    d = lock_deployment
    server = d.server()
    key = f"{d.queue}_expired"
    assert await server.lock.try_lock(key, time.time_ns() - 1)
    assert await server.lock.try_lock(key, time.time_ns() + MINUTE_NS)  # its stored deadline had passed
    assert not await server.lock.try_lock(key, time.time_ns() + MINUTE_NS)
    await server.aclose()


async def test_only_one_of_many_concurrent_takers_wins(lock_deployment: Deployment) -> None:
    d = lock_deployment
    servers = [d.server() for _ in range(3)]
    key, later = f"{d.queue}_race", time.time_ns() + MINUTE_NS
    won = await asyncio.gather(*(s.lock.try_lock(key, later) for s in servers for _ in range(5)))
    assert won.count(True) == 1
    for server in servers:
        await server.aclose()


async def test_a_claim_is_held_by_one_value_until_released(lock_deployment: Deployment) -> None:
    d = lock_deployment
    server = d.server()
    lock, key = server.lock, f"{d.queue}_unique"
    assert await lock.claim(key, "task_a", 60) is None  # taken now
    assert await lock.claim(key, "task_b", 60) == "task_a"  # the holder's value
    assert not await lock.release(key, "task_b")  # not b's to release
    assert await lock.claim(key, "task_b", 60) == "task_a"
    assert await lock.release(key, "task_a")
    assert not await lock.release(key, "task_a")
    assert await lock.claim(key, "task_b", 60) is None
    await server.aclose()


async def test_concurrent_claims_have_one_winner(lock_deployment: Deployment) -> None:
    d = lock_deployment
    server = d.server()
    key = f"{d.queue}_claim_race"
    held = await asyncio.gather(*(server.lock.claim(key, f"task_{i}", 60) for i in range(10)))
    winners = [f"task_{i}" for i, holder in enumerate(held) if holder is None]
    assert len(winners) == 1
    assert {holder for holder in held if holder is not None} == set(winners)
    await server.aclose()


async def test_turns_are_booked_one_interval_apart_after_the_burst(lock_deployment: Deployment) -> None:
    # The booked waits, not elapsed time: an hour-long interval leaves no room for a slow machine.
    d = lock_deployment
    server = d.server()
    interval = 3600.0
    single = [await server.lock.take_turn(f"{d.queue}_rate1", interval, 1) for _ in range(3)]
    assert single[0] == 0.0
    assert interval - 60 < single[1] <= interval
    assert 2 * interval - 60 < single[2] <= 2 * interval
    burst = [await server.lock.take_turn(f"{d.queue}_rate3", interval, 3) for _ in range(4)]
    assert burst[:3] == [0.0, 0.0, 0.0]
    assert interval - 60 < burst[3] <= interval
    await server.aclose()


async def test_concurrent_turns_are_each_booked_once(lock_deployment: Deployment) -> None:
    d = lock_deployment
    servers = [d.server() for _ in range(2)]
    interval = 3600.0
    waits = await asyncio.gather(*(s.lock.take_turn(f"{d.queue}_rate", interval, 1) for s in servers for _ in range(3)))
    slots = sorted(round(w / interval) for w in waits)
    assert slots == list(range(6))  # six distinct turns: none given twice
    for server in servers:
        await server.aclose()
