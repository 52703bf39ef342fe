"""Exactly-once chord callbacks under real concurrency: 4 worker processes, 500 chords of 10.

Each callback execution appends a record (a Redis list, or a SQLite table in its own file);
callbacks still waiting in the queue after the workers drain would count as sent too.
Every chord must be recorded exactly once, with its members' results in group order.
Nothing here asserts how long anything took; the waits only bound a broken run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REDIS_URL, config_for
from helpers import WORKFLOW_PROCS, stop_processes
from machinery import Chord, ChordAsyncResult, Group, Server, Signature
from machinery._sync import run_sync

pytestmark = pytest.mark.slow

PROCESSES = 4
CHORDS = 500
MEMBERS = 10
WAIT = 80.0


def read_records(kind: str, target: str) -> list[dict[str, object]]:
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            return [json.loads(raw) for raw in client.lrange(target, 0, -1)]
        finally:
            client.close()
    if not Path(target).exists():
        return []
    with sqlite3.connect(target, timeout=60) as conn:
        try:
            return [json.loads(row[0]) for row in conn.execute("SELECT payload FROM calls")]
        except sqlite3.OperationalError:  # no callback has run yet
            return []


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_every_chord_callback_is_sent_exactly_once(kind: str, tmp_path: Path, queue_name: str) -> None:
    config = config_for(kind, tmp_path, queue_name)
    target = f"{queue_name}_callback_runs" if kind == "redis" else str(tmp_path / "callback_runs.db")
    workers = [
        subprocess.Popen([sys.executable, str(WORKFLOW_PROCS), "worker", config.broker, queue_name, target])
        for _ in range(PROCESSES)
    ]
    server = Server(config)
    try:
        chords = [
            Chord(
                Group(*(Signature("stress_member", [i]) for i in range(MEMBERS))),
                Signature("stress_callback", [f"chord-{n}"]),
            )
            for n in range(CHORDS)
        ]

        async def send_all() -> list[ChordAsyncResult]:
            return [await server.asend_chord(chord) for chord in chords]

        results = asyncio.run(send_all())
        deadline = time.monotonic() + WAIT
        while len(read_records(kind, target)) < CHORDS and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers), "a worker process died"
            time.sleep(0.2)
        assert [r.get(timeout=WAIT) for r in results] == [sum(range(MEMBERS))] * CHORDS
    finally:
        stop_processes(workers, timeout=30)
    records = read_records(kind, target)
    left_in_queue = [s for s in server.get_pending_tasks() if s.name == "stress_callback"]
    runs = Counter(str(r["chord"]) for r in records)
    sent = len(records) + len(left_in_queue)
    duplicates = sent - len(set(runs) | {str(s.args[0].value) for s in left_in_queue if s.args})
    print(
        f"\n[{kind}] {PROCESSES} worker processes, {CHORDS} chords x {MEMBERS} members: "
        f"callbacks sent {sent}, run {len(records)}, left in queue {len(left_in_queue)}, duplicates {duplicates}"
    )
    assert sorted(runs) == sorted(f"chord-{n}" for n in range(CHORDS))
    assert duplicates == 0 and set(runs.values()) == {1} and not left_in_queue
    assert all(r["results"] == list(range(MEMBERS)) for r in records)  # group order
    for chord in chords[:20]:
        meta = run_sync(server.backend.get_group_meta(chord.group.group_uuid))
        assert meta is not None and meta.chord_triggered
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.delete(target, queue_name)
        client.close()
    server.close()
