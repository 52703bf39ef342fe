"""Several processes on one deployment: helper processes (``support.procs``) beside the test.

A worker SIGKILLed mid-task loses nothing; processes sending and working on one deployment
get every result; consumers in several processes never share a message; chord callbacks are
sent exactly once by competing worker processes; several schedulers send each tick once.
Nothing here asserts how long anything took; the deadlines only bound a broken run.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from machinery import STARTED, SUCCESS, Chord, ChordAsyncResult, Group, Signature
from machinery._sync import run_sync
from support.deployment import Deployment
from support.processes import Processes
from support.recording import FileRecord
from support.waiting import WAIT, wait_until
from support.workers import running_worker

pytestmark = pytest.mark.across_processes


def test_a_task_of_a_sigkilled_worker_completes_on_another(
    deployment: Deployment, processes: Processes, tmp_path: Path
) -> None:
    server = deployment.server()
    marker = tmp_path / "slow.started"
    ran: list[str] = []

    @server.task
    def slow(marker: str) -> str:  # the helper's task of the same name hangs on its first run only
        ran.append(marker)
        return "done"

    other = server.send_task(Signature("slow", [str(tmp_path / "never")]))  # the helper holds one at a time
    doomed = processes.start("worker", deployment.config(), "--concurrency", 1)
    result = server.send_task(Signature("slow", [str(marker)]))
    # STARTED is written just before the function runs; the marker says it is running.
    wait_until(lambda: marker.exists() or (tmp_path / "never").exists(), what="the helper starting a task")
    held = result if marker.exists() else other
    assert held.state().state == STARTED
    processes.kill(doomed)
    assert held.state().state == STARTED  # it never finished
    # The survivor gets the dead worker's message back (lease, heartbeat or connection gone).
    with running_worker(server, concurrency=2):
        assert result.get(timeout=WAIT) == "done" and other.get(timeout=WAIT) == "done"
    assert result.state().state == SUCCESS
    assert deployment.queued_bodies() == [] and deployment.taken_count() == 0


def test_several_processes_send_and_work_on_one_deployment(deployment: Deployment, processes: Processes) -> None:
    server = deployment.server()
    config = deployment.config()
    workers = processes.start_many(2, "worker", config, "--concurrency", 4)
    senders = [processes.start("send", config, "--base", base, "--count", 40) for base in (1000, 2000)]
    sent = [json.loads(line) for sender in senders for line in processes.output(sender)]
    assert len(sent) == 80
    deployment.track(*(task_uuid for task_uuid, _ in sent))
    for task_uuid, expected in sent:
        assert server.result(task_uuid).get(timeout=WAIT) == expected
    processes.stop(workers)
    assert all(w.process.returncode == 0 for w in workers), processes.logs()
    assert server.get_pending_tasks() == []
    assert deployment.queued_bodies() == [] and deployment.taken_count() == 0


@pytest.mark.known_gap("exclusive_delivery")
def test_consumers_in_several_processes_never_share_a_message(
    broker_deployment: Deployment, processes: Processes
) -> None:
    d = broker_deployment
    server = d.server()
    sigs = [Signature("add", [i, 0], uuid=f"task_{d.queue}_{i}", routing_key=d.queue) for i in range(300)]
    consumers = processes.start_many(3, "consume", d.config(), "--idle", 2.0)
    run_sync(server.broker.publish_many(sigs))
    taken = [
        [Signature.decode(body.encode()).uuid for body in json.loads(processes.output(c, WAIT * 2)[-1])]
        for c in consumers
    ]
    flat = [u for part in taken for u in part]
    assert len(flat) == len(set(flat)), "a message was delivered to two consumers"
    assert sorted(flat) == sorted(s.uuid for s in sigs)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a bound for a broken run on a loaded machine, not an expectation
def test_every_chord_callback_is_sent_exactly_once_by_competing_workers(
    deployment: Deployment, processes: Processes, tmp_path: Path
) -> None:
    chords_count, members, workers_count = deployment.scaled(100), 10, 4
    record = FileRecord(tmp_path / "callbacks.jsonl")
    # Leases and heartbeats of 30 s (the default): on a loaded machine the suite's short ones can
    # run out under a busy process, and a redelivered callback then legitimately runs twice.
    config = deployment.config(heartbeat_timeout=30.0)
    server = deployment.server(heartbeat_timeout=30.0)
    workers = processes.start_many(workers_count, "worker", config, "--concurrency", 8, "--record", record.path)
    chords = [
        Chord(
            Group(*(Signature("stress_member", [i]) for i in range(members))),
            Signature("stress_callback", [f"chord-{n}"]),
        )
        for n in range(chords_count)
    ]

    async def send_all() -> list[ChordAsyncResult]:
        sent = [await server.asend_chord(chord) for chord in chords]
        await server.aclose()
        return sent

    results = asyncio.run(send_all())
    wait_until(lambda: len(record) >= chords_count, timeout=WAIT * 4, what="every chord callback")
    assert [r.get(timeout=WAIT) for r in results] == [sum(range(members))] * chords_count
    processes.stop(workers)
    records = record.read()
    left_in_queue = [s for s in server.get_pending_tasks() if s.name == "stress_callback"]
    runs = Counter(str(r["chord"]) for r in records)
    print(
        f"\n[{deployment.name}] {workers_count} worker processes, {chords_count} chords x {members} members: "
        f"callbacks run {len(records)}, left in queue {len(left_in_queue)}"
    )
    assert sorted(runs) == sorted(f"chord-{n}" for n in range(chords_count))
    assert set(runs.values()) == {1} and not left_in_queue  # each exactly once
    assert all(r["results"] == list(range(members)) for r in records)  # group order
    for chord in chords[:20]:
        meta = run_sync(server.backend.get_group_meta(chord.group.group_uuid))
        assert meta is not None and meta.chord_triggered


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_schedulers_send_each_tick_once(deployment: Deployment, processes: Processes) -> None:
    server = deployment.server()
    server.get_pending_tasks()  # the store exists before three processes race to make it
    schedulers = processes.start_many(3, "periodic", deployment.config(), "--spec", "@every 1s", "--name", "tick")

    def fired() -> list[int]:
        return [int(line.split()[1]) for s in schedulers for line in s.lines() if line.startswith("FIRED ")]

    # The scenario's length is counted in ticks sent, not in seconds slept.
    wait_until(lambda: len(set(fired())) >= 6, timeout=WAIT * 2, what="six ticks")
    assert all(s.alive() for s in schedulers), "a scheduler process died"
    processes.stop(schedulers)
    ticks = Counter(fired())
    sent = server.get_pending_tasks()
    deployment.track(*(s.uuid for s in sent))
    print(f"\n[{deployment.name}] 3 schedulers, @every 1s: {len(sent)} sends for {len(ticks)} ticks")
    assert all(s.name == "tick" for s in sent) and len({s.uuid for s in sent}) == len(sent)
    assert len(sent) == sum(ticks.values())  # every send is a fired tick ...
    assert set(ticks.values()) == {1}  # ... and no tick was fired twice
    first, last = min(ticks), max(ticks)
    assert sorted(ticks) == list(range(first, last + 1))  # no tick in between went without a send
