"""What is specific to the Memcache backend: Go's keys, JSON, flags and absolute expiry,
gomemcache's choice of server, a chord flag that flips once under contention (Go's ``Lock``
honoured), and a Redis broker with it end to end."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from typing import Any

import pytest

from machinery import Chord, Config, Group, Server, Signature
from machinery._drivers.memcache import parse_memcache_url, pick_server
from machinery._sync import run_sync
from machinery.backends.memcache import MemcacheBackend
from machinery.errors import ConfigError
from machinery.state import PENDING, STARTED, SUCCESS, GroupMeta, TaskState
from machinery.types import TaskResult
from support.fixtures import unique
from support.interop import INTEROP_DIR
from support.memcached import Memcached
from support.services import REDIS_URL, require_service
from support.workers import running_worker

TTL = 600


def backend_for(url: str, ttl: int = TTL) -> MemcacheBackend:
    return MemcacheBackend(Config(broker="memory://", result_backend=url, results_expire_in=ttl), url)


def test_urls_list_the_servers_in_order() -> None:
    assert parse_memcache_url("memcache://10.0.0.1:11211,10.0.0.2:11300,h3") == [
        ("10.0.0.1", 11211),
        ("10.0.0.2", 11300),
        ("h3", 11211),
    ]
    with pytest.raises(ConfigError, match="names no server"):
        parse_memcache_url("memcache://")


def test_the_server_of_a_key_is_gomemcaches() -> None:
    key = b"task_b01476d0-d092-439c-affd-85ce86a25bf2"
    assert pick_server(key, 1) == 0
    assert pick_server(key, 3) == zlib.crc32(key) % 3  # CRC-32/IEEE, as Go's crc32.ChecksumIEEE


def test_states_are_gos_json_flags_and_absolute_expiry(memcached_server: Memcached) -> None:
    backend = backend_for(memcached_server.url)
    uuid = unique("task")

    async def scenario() -> TaskState | None:
        try:
            await backend.write_states([TaskState(uuid, PENDING, "add")], False)
            await backend.write_states([TaskState(uuid, SUCCESS, "add", [TaskResult("int64", 2)])], True)
            return await backend.get_state(uuid)
        finally:
            await backend.close()

    state = run_sync(scenario())
    assert state is not None and state.state == SUCCESS and state.results == [TaskResult("int64", 2)]
    held = memcached_server.meta_get(uuid)
    assert held is not None
    seconds_left, flags, value = held
    # memcached keeps its own clock, ticked once a second from its start, which runs a few
    # seconds apart from the system's: an absolute expiry reads back within that slack.
    assert flags == 0 and 0 < seconds_left <= TTL + 5
    stored = json.loads(value)
    assert list(stored) == ["TaskUUID", "TaskName", "State", "Results", "Error", "CreatedAt", "TTL"]
    assert stored["State"] == SUCCESS and stored["Results"] == [{"Type": "int64", "Value": 2}]


def test_a_state_written_by_go_is_read(memcached_server: Memcached) -> None:
    go_state = (INTEROP_DIR / "backend_state_success.json").read_bytes().strip()
    uuid = json.loads(go_state)["TaskUUID"]
    backend = backend_for(memcached_server.url)

    async def scenario() -> TaskState | None:
        client = backend.connector.client_for(uuid.encode())
        await client.set(uuid.encode(), go_state, int(time.time()) + 60)
        try:
            return await backend.get_state(uuid)
        finally:
            await client.delete(uuid.encode())
            await backend.close()

    state = run_sync(scenario())
    assert state is not None and state.task_name == "add" and state.results == [TaskResult("int64", 2)]


def test_later_states_keep_the_creation_time(memcached_server: Memcached) -> None:
    backend = backend_for(memcached_server.url)
    uuid = unique("task")

    async def scenario() -> tuple[Any, Any]:
        try:
            await backend.set_pending([Signature("add", [], uuid=uuid)])
            first = await backend.get_state(uuid)
            await backend.write_states([TaskState(uuid, STARTED, "add")], True)
            later = await backend.get_state(uuid)
            assert first is not None and later is not None
            return first.created_at, later.created_at
        finally:
            await backend.close()

    created, kept = run_sync(scenario())
    assert created is not None and kept == created


def test_each_key_lives_on_the_server_gomemcache_picks(memcached_pair: tuple[Memcached, Memcached]) -> None:
    first, second = memcached_pair
    url = f"memcache://127.0.0.1:{first.port},127.0.0.1:{second.port}"
    backend = backend_for(url)
    uuids = [unique("task") for _ in range(20)]

    async def scenario() -> list[TaskState | None]:
        try:
            await backend.write_states([TaskState(u, PENDING, "add") for u in uuids], False)
            return await backend.get_states(uuids)
        finally:
            await backend.close()

    states = run_sync(scenario())
    assert [s.task_uuid if s else None for s in states] == uuids
    servers = (first, second)
    for u in uuids:
        home = servers[zlib.crc32(u.encode()) % 2]
        other = servers[1 - zlib.crc32(u.encode()) % 2]
        assert home.meta_get(u) is not None and other.meta_get(u) is None
    assert {zlib.crc32(u.encode()) % 2 for u in uuids} == {0, 1}  # both servers used


def test_the_chord_flag_flips_for_exactly_one_of_many(memcached_server: Memcached) -> None:
    backend = backend_for(memcached_server.url)
    group = unique("group")

    async def scenario() -> list[bool]:
        try:
            await backend.init_group(group, ["a", "b"])
            return list(await asyncio.gather(*(backend.trigger_chord(group, 2) for _ in range(30))))
        finally:
            await backend.close()

    wins = run_sync(scenario())
    assert wins.count(True) == 1


def test_a_go_worker_holding_the_group_lock_is_waited_for(memcached_server: Memcached) -> None:
    """Go sets ``Lock`` while it flips the flag; a trigger that finds it waits, then sees the
    flag Go set and does not fire a second callback."""
    backend = backend_for(memcached_server.url)
    group = unique("group")
    locked = GroupMeta(group, ["a"], chord_triggered=False, lock=True)

    async def scenario() -> bool:
        client = backend.connector.client_for(group.encode())
        await client.set(group.encode(), locked.encode(), int(time.time()) + 60)
        try:
            trigger = asyncio.ensure_future(backend.trigger_chord(group, 1))
            await asyncio.sleep(0.05)
            assert not trigger.done()  # still waiting on Go's lock
            done = GroupMeta(group, ["a"], chord_triggered=True, lock=False)
            await client.set(group.encode(), done.encode(), int(time.time()) + 60)
            return await asyncio.wait_for(trigger, 10)
        finally:
            await backend.close()

    assert run_sync(scenario()) is False


@pytest.mark.redis
def test_a_redis_broker_with_a_memcache_backend(memcached_server: Memcached) -> None:
    require_service("Redis", REDIS_URL, 6379)
    queue = unique("memcache_q")
    server = Server(
        Config(broker=REDIS_URL, result_backend=memcached_server.url, default_queue=queue, results_expire_in=TTL)
    )

    @server.task("add")
    def add(a: int, b: int) -> int:
        return a + b

    @server.task("total")
    def total(*values: int) -> int:
        return sum(values)

    try:
        with running_worker(server, concurrency=4):
            assert server.send_task(Signature("add", [1, 2])).get(timeout=30) == 3
            chord = Chord(Group(*(Signature("add", [i, i]) for i in range(5))), Signature("total"))
            assert server.send_chord(chord).get(timeout=30) == 20
    finally:
        server.close()
