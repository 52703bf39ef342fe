"""SQLite's cross-process wake-ups and its per-tick write batches.

A listener stands for another process's watcher (each ``WakeChannel`` has a socket of its own,
as each process does); nothing here asserts how long anything took: every wait is bounded
only so that a broken implementation fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery._drivers import sqlite_wake
from machinery._drivers.sqlite_batch import TickBatcher
from machinery._drivers.sqlite_wake import WakeChannel
from machinery.backends.sqlite import SQLiteBackend
from machinery.state import STARTED, SUCCESS, TaskState
from support.configs import config_for

WAIT = 30.0  # upper bound for anything to happen; never an expectation of speed

linux_only = pytest.mark.skipif(not sqlite_wake.supported(), reason="abstract Unix sockets are Linux's")


@pytest.fixture
def channels(tmp_path: Path) -> Iterator[list[WakeChannel]]:
    made: list[WakeChannel] = []
    yield made
    for channel in made:
        channel.close()


def channel(channels: list[WakeChannel], path: Path) -> WakeChannel:
    made = WakeChannel(str(path))
    channels.append(made)
    return made


@linux_only
def test_a_commit_wakes_the_listeners_of_the_same_file_only(tmp_path: Path, channels: list[WakeChannel]) -> None:
    listener = channel(channels, tmp_path / "a.db")
    elsewhere = channel(channels, tmp_path / "b.db")
    assert listener.listen() and elsewhere.listen()
    writer = channel(channels, tmp_path / "a.db")
    writer.notify(own=None)
    assert listener.wait(WAIT)
    assert not elsewhere.wait(0)  # another file's listener heard nothing
    assert not listener.wait(0)  # the wake-up was consumed


@linux_only
def test_a_writer_does_not_wake_itself(tmp_path: Path, channels: list[WakeChannel]) -> None:
    own = channel(channels, tmp_path / "a.db")
    assert own.listen()
    own.notify(own=own.name)
    assert not own.wait(0)  # its own process is woken directly, not through the socket
    own.poke_self()
    assert own.wait(WAIT)  # ...except to stop or hurry its own watcher


@linux_only
def test_markers_of_gone_listeners_are_removed_and_close_withdraws_its_own(
    tmp_path: Path, channels: list[WakeChannel]
) -> None:
    listener = channel(channels, tmp_path / "a.db")
    assert listener.listen()
    assert listener.name is not None
    gone = WakeChannel(str(tmp_path / "a.db"))
    assert gone.listen()
    gone_marker = Path(gone.directory) / str(gone.name)
    gone._listener.close()  # type: ignore[union-attr]  # its process died: the socket is gone, the marker stays
    assert gone_marker.exists()
    channel(channels, tmp_path / "a.db").notify(own=None)
    assert not gone_marker.exists()
    assert listener.wait(WAIT)  # the live one was still woken
    listener.close()
    assert os.listdir(listener.directory) == []


async def test_the_writes_of_one_tick_are_one_job_and_each_caller_gets_its_own_result() -> None:
    jobs: list[list[int]] = []

    def submit(items: list[int]) -> concurrent.futures.Future[list[int]]:
        jobs.append(items)
        done: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        done.set_result([item * 10 for item in items])
        return done

    batcher: TickBatcher[int, int] = TickBatcher(submit)
    assert await asyncio.gather(*(batcher.add(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert await batcher.add(7) == 70  # a later tick: a job of its own
    assert jobs == [[0, 1, 2, 3, 4], [7]]


async def test_a_failed_batch_fails_every_caller_in_it() -> None:
    def submit(items: list[int]) -> concurrent.futures.Future[list[int]]:
        done: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        done.set_exception(OSError("disk full"))
        return done

    batcher: TickBatcher[int, int] = TickBatcher(submit)
    results = await asyncio.gather(batcher.add(1), batcher.add(2), return_exceptions=True)
    assert [type(r) for r in results] == [OSError, OSError]


async def test_concurrent_state_writes_are_all_stored(tmp_path: Path, queue_name: str) -> None:
    config = config_for("sqlite", tmp_path, queue_name)
    backend = SQLiteBackend(config, config.broker)
    try:
        uuids = [f"task_{i}" for i in range(50)]
        await asyncio.gather(*(backend.write_states([TaskState(u, STARTED, "t")], True) for u in uuids))
        await asyncio.gather(*(backend.write_states([TaskState(u, SUCCESS, "t")], True) for u in uuids))
        states = await backend.get_states(uuids)
        assert [s.state if s else None for s in states] == [SUCCESS] * 50
    finally:
        await backend.close()


async def test_a_failed_unflushed_write_leaves_the_connection_fully_synced(tmp_path: Path, queue_name: str) -> None:
    config = config_for("sqlite", tmp_path, queue_name)
    backend = SQLiteBackend(config, config.broker)
    store = backend.store
    try:
        await store.ensure_open()

        def fails_inside_a_transaction(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO locks (key, deadline) VALUES ('k', 1)")
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await asyncio.wrap_future(store.submit(store.unflushed, fails_inside_a_transaction))

        def level(conn: sqlite3.Connection) -> tuple[int, int]:
            return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute(
                "SELECT COUNT(*) FROM locks"
            ).fetchone()[0]

        assert await store.run(level) == (2, 0)  # FULL again, and the write rolled back
    finally:
        await backend.close()
