"""The result backend contract (backends/base.py) on every backend.

States in Go's sequence and JSON with Go's CreatedAt rule, the expiry refreshed by every
write, group metadata, a chord decided exactly once however many members race for it, and
``await_state`` woken by the write itself rather than by polling.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from machinery import FAILURE, PENDING, RECEIVED, RETRY, STARTED, SUCCESS, Server, Signature, TaskResult, TaskState
from machinery._sync import run_sync
from support.deployment import Deployment
from support.processes import Processes
from support.waiting import WAIT


def member_signatures(d: Deployment, group_uuid: str, count: int) -> list[Signature]:
    sigs = [
        Signature("add", [i], uuid=f"task_{d.queue}_m{i}", group_uuid=group_uuid, group_task_count=count)
        for i in range(count)
    ]
    d.track(group_uuid, *(s.uuid for s in sigs))
    return sigs


async def test_state_sequence_keeps_the_pending_created_at(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    backend = server.backend
    sig = Signature("add", [1, 2], uuid=f"task_{d.queue}")
    d.track(sig.uuid)
    await backend.set_pending([sig])
    pending = await backend.get_state(sig.uuid)
    assert pending is not None and (pending.state, pending.task_name) == (PENDING, "add")
    assert pending.created_at is not None
    seen = [pending]
    for state in (RECEIVED, STARTED):
        await backend.set_state(sig, state)
        stored = await backend.get_state(sig.uuid)
        assert stored is not None and stored.state == state
        seen.append(stored)
    await backend.set_state(sig, SUCCESS, [TaskResult("int64", 3)])
    final = await backend.get_state(sig.uuid)
    assert final is not None and final.is_completed()
    assert (final.state, final.task_name, final.error) == (SUCCESS, "add", "")
    assert [r.to_wire() for r in final.results or []] == [{"Type": "int64", "Value": 3}]
    # Go's rule: every later state keeps the CreatedAt of PENDING.
    assert {s.created_at for s in [*seen, final]} == {pending.created_at}
    assert await backend.get_states([sig.uuid, f"task_{d.queue}_missing"]) == [final, None]
    await server.aclose()


async def test_one_write_of_several_states_of_a_task_stores_them_in_order(backend_deployment: Deployment) -> None:
    # A worker writes a task's states of one moment together (RECEIVED and STARTED, say): a
    # driver may write different tasks' states at once, one task's only one after the other.
    d = backend_deployment
    server = d.server()
    sigs = [Signature("add", [i], uuid=f"task_{d.queue}_{i}") for i in range(5)]
    d.track(*(s.uuid for s in sigs))
    await server.backend.set_pending(sigs)
    order = (RECEIVED, STARTED, RETRY, PENDING, RECEIVED, STARTED, SUCCESS)
    await server.backend.write_states([TaskState(s.uuid, state, "add") for state in order for s in sigs], True)
    assert [state.state if state else None for state in await server.backend.get_states([s.uuid for s in sigs])] == [
        SUCCESS
    ] * len(sigs)
    await server.aclose()


async def test_a_failure_keeps_its_error_and_no_results(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    sig = Signature("boom", [], uuid=f"task_{d.queue}")
    d.track(sig.uuid)
    await server.backend.set_pending([sig])
    await server.backend.set_state(sig, FAILURE, error="bad input 42")
    state = await server.backend.get_state(sig.uuid)
    assert state is not None and (state.state, state.error, state.results) == (FAILURE, "bad input 42", None)
    await server.aclose()


async def test_a_state_written_without_keeping_created_replaces_it(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    task_uuid = f"task_{d.queue}"
    d.track(task_uuid)
    await server.backend.write_states([TaskState(task_uuid, PENDING, "add")], False)
    first = await server.backend.get_state(task_uuid)
    assert first is not None
    await server.backend.set_pending([Signature("add", [], uuid=task_uuid)])  # sent again: a new PENDING
    second = await server.backend.get_state(task_uuid)
    assert second is not None and second.state == PENDING and second.created_at != first.created_at
    await server.aclose()


async def test_every_write_refreshes_the_expiry(backend_deployment: Deployment) -> None:
    # Two servers on one store that differ only in results_expire_in: an expiry beyond the
    # first's after the second wrote shows that the write set it anew (no clock involved).
    d = backend_deployment
    short, long = d.server(results_expire_in=600), d.server(results_expire_in=1800)
    sig = Signature("add", [], uuid=f"task_{d.queue}")
    d.track(sig.uuid)
    await short.backend.set_pending([sig])
    first = await d.aexpiry(sig.uuid, server=short)
    assert first is not None and 0 < first <= 600
    await long.backend.set_state(sig, STARTED)
    second = await d.aexpiry(sig.uuid, server=long)
    assert second is not None and 600 < second <= 1800
    await short.backend.set_state(sig, SUCCESS)
    third = await d.aexpiry(sig.uuid, server=short)
    assert third is not None and 0 < third <= 600
    await short.aclose()
    await long.aclose()


async def test_purged_states_are_gone(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    sig = Signature("add", [], uuid=f"task_{d.queue}")
    d.track(sig.uuid)
    await server.backend.set_pending([sig])
    await server.backend.purge_state(sig.uuid)
    assert await server.backend.get_state(sig.uuid) is None
    await server.aclose()


async def test_group_metadata_and_completion(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    backend = server.backend
    group_uuid = f"group_{d.queue}"
    members = member_signatures(d, group_uuid, 3)
    await backend.init_group(group_uuid, [m.uuid for m in members])
    meta = await backend.get_group_meta(group_uuid)
    assert meta is not None and meta.task_uuids == [m.uuid for m in members] and not meta.chord_triggered
    await backend.set_state(members[0], SUCCESS, [TaskResult("int64", 0)])
    await backend.set_state(members[1], FAILURE, error="x")
    assert not await backend.group_completed(group_uuid, 3)
    await backend.set_state(members[2], SUCCESS, [TaskResult("int64", 2)])
    assert await backend.group_completed(group_uuid, 3)
    states = await backend.group_task_states(group_uuid)
    assert [s.task_uuid for s in states if s is not None] == [m.uuid for m in members]  # group order
    assert [s.state for s in states if s is not None] == [SUCCESS, FAILURE, SUCCESS]
    assert await backend.trigger_chord(group_uuid, 3)
    assert not await backend.trigger_chord(group_uuid, 3)
    meta = await backend.get_group_meta(group_uuid)
    assert meta is not None and meta.chord_triggered
    d.track(f"group_{d.queue}_none")
    assert await backend.trigger_chord(f"group_{d.queue}_none", 1) is False
    await backend.purge_group_meta(group_uuid)
    await server.aclose()


def test_the_chord_is_triggered_exactly_once_under_concurrent_members(backend_deployment: Deployment) -> None:
    # Members finishing at once on four workers (servers of their own, loops on threads of
    # their own): exactly one of the 4 x 5 deciders wins.
    d = backend_deployment
    group_uuid = f"group_{d.queue}"
    members = member_signatures(d, group_uuid, 4)
    first = d.server()
    run_sync(first.backend.init_group(group_uuid, [m.uuid for m in members]))
    for member in members:
        run_sync(first.backend.set_state(member, SUCCESS, [TaskResult("int64", 1)]))
    servers = [d.server() for _ in range(4)]
    barrier = threading.Barrier(len(servers))
    outcomes: list[bool] = []
    lock = threading.Lock()

    def race(server: Server) -> None:
        async def decide() -> list[bool]:
            barrier.wait(WAIT)
            won = await asyncio.gather(*(server.backend.trigger_chord(group_uuid, 4) for _ in range(5)))
            await server.aclose()
            return list(won)

        won = asyncio.run(decide())
        with lock:
            outcomes.extend(won)

    threads = [threading.Thread(target=race, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert len(outcomes) == 20 and outcomes.count(True) == 1, outcomes


@pytest.mark.across_processes
def test_chord_trigger_and_lock_are_atomic_across_processes(deployment: Deployment, processes: Processes) -> None:
    d = deployment
    server = d.server()
    group_uuid = f"group_{d.queue}"
    (member,) = member_signatures(d, group_uuid, 1)
    run_sync(server.backend.init_group(group_uuid, [member.uuid]))
    run_sync(server.backend.set_state(member, SUCCESS))
    racers = processes.start_many(
        4, "race", d.config(), "--group", group_uuid, "--key", f"{d.queue}_lock", "--at", time.time() + 1.0
    )
    outcomes = [json.loads(processes.output(racer)[-1]) for racer in racers]
    assert [o["chord"] for o in outcomes].count(True) == 1, outcomes
    assert [o["lock"] for o in outcomes].count(True) == 1, outcomes


async def test_await_state_wakes_on_a_write_without_polling(backend_deployment: Deployment) -> None:
    d = backend_deployment
    waiter, writer = d.server(), d.server()
    waiter.backend.poll_interval = 3600.0  # only the write itself can wake it within WAIT
    task_uuid = f"task_{d.queue}"
    d.track(task_uuid)
    await waiter.backend.write_states([TaskState(task_uuid, PENDING, "add")], False)
    waiting = asyncio.ensure_future(waiter.backend.await_state(task_uuid, WAIT))

    def write() -> None:
        async def go() -> None:
            await writer.backend.write_states([TaskState(task_uuid, STARTED, "add")], True)
            await writer.backend.write_states([TaskState(task_uuid, SUCCESS, "add", [TaskResult("int64", 3)])], True)
            await writer.aclose()

        asyncio.run(go())

    await asyncio.sleep(0)  # the waiter has read the PENDING state and sleeps
    await asyncio.to_thread(write)
    state = await waiting
    assert state.state == SUCCESS and state.results is not None and state.results[0].value == 3
    await waiter.aclose()


@pytest.mark.across_processes
async def test_await_state_wakes_on_a_write_by_another_process(
    backend_deployment: Deployment, processes: Processes
) -> None:
    d = backend_deployment
    server = d.server()
    server.backend.poll_interval = 3600.0
    task_uuid = f"task_{d.queue}"
    d.track(task_uuid)
    waiting = asyncio.ensure_future(server.backend.await_state(task_uuid, WAIT))
    await asyncio.sleep(0)
    writer = await asyncio.to_thread(processes.start, "complete", d.config(), "--uuid", task_uuid)
    state = await waiting
    assert state.state == SUCCESS and state.results is not None and state.results[0].value == 3
    await asyncio.to_thread(processes.output, writer)
    await server.aclose()


async def test_await_state_times_out_on_a_task_that_never_completes(backend_deployment: Deployment) -> None:
    d = backend_deployment
    server = d.server()
    task_uuid = f"task_{d.queue}"
    d.track(task_uuid)
    await server.backend.write_states([TaskState(task_uuid, PENDING, "add")], False)
    try:
        await server.backend.await_state(task_uuid, 0.3)
    except TimeoutError as exc:
        assert task_uuid in str(exc)
    else:
        raise AssertionError("await_state returned for a task that never completed")
    await server.aclose()
