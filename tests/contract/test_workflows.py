"""Chains, groups and chords (docs/wire.md §6.3, 8) end to end on every deployment, and Go's
own workflow messages pushed raw into each broker's queue.

Waits are bounded only so that a broken workflow fails instead of hanging; nothing here
asserts how long anything took. "Promptly" is shown by order instead: a failed member is
reported while another member is still blocked on an event the test releases afterwards.
The wire shape of workflows, with no broker involved, is in tests/unit/test_workflows.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from machinery import (
    FAILURE,
    Chain,
    ChainAsyncResult,
    Chord,
    ChordAsyncResult,
    Group,
    GroupMeta,
    Server,
    Signature,
    TaskFailed,
)
from machinery._sync import run_sync
from machinery.workflow import chords as workflow_module
from support.deployment import Deployment
from support.interop import INTEROP_DIR
from support.recording import Recorder, register_workflow_tasks
from support.waiting import WAIT, wait_until
from support.workers import running_worker


@pytest.fixture
def env(deployment: Deployment) -> Iterator[tuple[Server, Recorder]]:
    server = deployment.server()
    rec = register_workflow_tasks(server)
    yield server, rec
    rec.gate.set()


def sig(name: str, *args: Any, **options: Any) -> Signature:
    return Signature(name, list(args), **options)


# --------------------------------------------------------------------------- the seed's examples


def test_seed_examples(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    with running_worker(server, concurrency=4):
        chain = Chain(sig("add", 1, 1), sig("add", 5, 5), sig("multiply", 4))
        chain_result = server.send_chain(chain)
        assert isinstance(chain_result, ChainAsyncResult)
        assert chain_result.get(timeout=WAIT) == 48  # multiply(4, add(5, 5, add(1, 1)))

        group = Group(sig("add", 1, 1), sig("add", 5, 5))
        assert [r.get(timeout=WAIT) for r in server.send_group(group, send_concurrency=0)] == [2, 10]

        chord = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply"))
        chord_result = server.send_chord(chord, send_concurrency=0)
        assert isinstance(chord_result, ChordAsyncResult)
        assert chord_result.get(timeout=WAIT) == 20  # multiply(2, 10)


def test_async_twins(env: tuple[Server, Recorder]) -> None:
    server, _ = env

    async def scenario() -> tuple[Any, Any, Any]:
        chain = await server.asend_chain(Chain(sig("add", 1, 1), sig("add", 5, 5), sig("multiply", 4)))
        group = await server.asend_group(Group(sig("add", 1, 1), sig("add", 5, 5)))
        chord = await server.asend_chord(Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply")))
        return (
            await chain.aget(WAIT),
            [await r.aget(WAIT) for r in group],
            await chord.aget(WAIT),
        )

    with running_worker(server, concurrency=4):
        assert asyncio.run(scenario()) == (48, [2, 10], 20)


def test_group_metadata_then_pending_then_publish(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    order: list[str] = []
    backend, broker = server.backend, server.broker
    init, pending, publish = backend.init_group, backend.set_pending, broker.publish_many

    async def spy_init(group_uuid: str, task_uuids: Any) -> None:
        order.append("init")
        await init(group_uuid, task_uuids)

    async def spy_pending(signatures: Any) -> None:
        order.append(f"pending:{len(signatures)}")
        await pending(signatures)

    async def spy_publish(signatures: Any) -> None:
        order.append("publish")
        await publish(signatures)

    backend.init_group = spy_init  # type: ignore[method-assign]
    backend.set_pending = spy_pending  # type: ignore[method-assign]
    broker.publish_many = spy_publish  # type: ignore[method-assign]
    group = Group(sig("add", 1, 1), sig("add", 2, 2), sig("add", 5, 6))
    server.send_group(group)
    assert order == ["init", "pending:3", "publish"]
    meta = run_sync(backend.get_group_meta(group.group_uuid))
    assert isinstance(meta, GroupMeta) and meta.task_uuids == group.task_uuids and not meta.chord_triggered
    assert [run_sync(backend.get_state(u)).state for u in group.task_uuids] == ["PENDING"] * 3  # type: ignore[union-attr]
    assert all(s.headers == {} for s in group.signatures)  # as Go's SendGroup


# --------------------------------------------------------------------------- Go's Immutable rule


def test_immutable_predecessor_stops_result_passing(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    with running_worker(server, concurrency=2):
        # The finished step's flag decides (docs/wire.md §6.3): add(5, 5) gets nothing appended.
        assert server.send_chain(Chain(sig("add", 1, 1, immutable=True), sig("add", 5, 5))).get(WAIT) == 10
        # The next step's own flag is not consulted: Go still appended 2 (interop capture).
        assert server.send_chain(Chain(sig("add", 1, 1), sig("add", 5, 5, immutable=True))).get(WAIT) == 12


def test_chord_callback_immutable_flag_is_its_own(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    with running_worker(server, concurrency=2):
        mutable = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply", 3))
        assert server.send_chord(mutable).get(WAIT) == 60  # multiply(3, 2, 10): results in group order
        immutable = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply", 3, immutable=True))
        assert server.send_chord(immutable).get(WAIT) == 3
    assert sorted(rec.of("multiply")) == [(3,), (3, 2, 10)]


# --------------------------------------------------------------------------- failures


def test_chain_stops_at_failed_step_after_retries_and_runs_on_error(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    chain = Chain(
        sig("add", 1, 1),
        sig("fail", "step two broke", retry_count=1, on_error=[sig("on_error", 7)]),
        sig("multiply", 4),
    )
    with running_worker(server, concurrency=2):
        result = server.send_chain(chain)
        with pytest.raises(TaskFailed) as failed:
            result.get(timeout=WAIT)
        assert failed.value.task_uuid == chain.signatures[1].uuid
        assert failed.value.error == "step two broke"
        assert result.state().state == FAILURE
        wait_until(lambda: rec.of("on_error"), timeout=WAIT, what="the OnError callback")
    assert len(rec.of("fail")) == 2  # the first run and its one retry
    assert rec.of("on_error") == [("step two broke", 7)]  # error text prepended, as Go
    assert rec.of("multiply") == []
    assert run_sync(server.backend.get_state(chain.signatures[2].uuid)) is None  # never sent


def test_chord_with_a_failing_member_raises_promptly_and_never_sends_callback(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    chord = Chord(Group(sig("add", 1, 1), sig("fail", "member broke"), sig("gated", 3)), sig("multiply"))
    with running_worker(server, concurrency=4):
        result = server.send_chord(chord)
        with pytest.raises(TaskFailed) as failed:
            result.get(timeout=WAIT)
        # Raised while the gated member is still running: no waiting for the whole group.
        assert rec.of("gated") == []
        assert failed.value.task_uuid == chord.group.signatures[1].uuid
        assert failed.value.error == "member broke"
        rec.gate.set()
        assert server.result(chord.group.signatures[2].uuid).get(WAIT) == 3
        callback = wait_until(lambda: _completed(server, chord.callback.uuid), timeout=WAIT, what="the chord decision")
    assert callback.state == FAILURE and chord.group.signatures[1].uuid in callback.error
    assert rec.of("multiply") == []  # the callback was never sent


def test_chord_whose_last_member_fails_is_still_decided(env: tuple[Server, Recorder]) -> None:
    """Go evaluates chords only after successes; here the last member to finish fails."""
    server, rec = env
    chord = Chord(Group(sig("add", 1, 1), sig("gated_fail", "last one broke"), sig("add", 2, 2)), sig("multiply"))
    last = chord.group.signatures[1]
    with running_worker(server, concurrency=4):
        result = server.send_chord(chord)
        for member in (chord.group.signatures[0], chord.group.signatures[2]):
            server.result(member.uuid).get(WAIT)
        rec.gate.set()  # only now may the failing member finish: it is the last one
        with pytest.raises(TaskFailed) as failed:
            result.get(timeout=WAIT)
        assert failed.value.task_uuid == last.uuid
        callback = wait_until(lambda: _completed(server, chord.callback.uuid), timeout=WAIT, what="the chord decision")
    assert callback.state == FAILURE and "last one broke" in callback.error
    assert run_sync(server.backend.get_group_meta(chord.group.group_uuid)).chord_triggered  # type: ignore[union-attr]
    assert rec.of("multiply") == []


# --------------------------------------------------------------------------- send concurrency


def test_group_send_concurrency_two(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    batches = record_batches(server)
    progress: list[tuple[int, int]] = []
    with running_worker(server, concurrency=4):
        group = Group(*(sig("add", i, i) for i in range(5)))
        results = server.send_group(group, send_concurrency=2, on_progress=lambda n, total: progress.append((n, total)))
        assert [r.get(WAIT) for r in results] == [0, 2, 4, 6, 8]
    assert sum(batches) == 5 and max(batches) <= 2
    assert progress[-1] == (5, 5)


# --------------------------------------------------------------------------- exactly-once repairs


@pytest.fixture
def fast_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workflow_module, "RECOVERY_GRACE", 0.05)


@pytest.mark.usefixtures("fast_recovery")
def test_chord_callback_survives_a_crash_between_trigger_and_send(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    trigger = server.backend.trigger_chord
    crashed: list[str] = []

    async def trigger_then_crash(group_uuid: str, task_count: int) -> bool:
        won = await trigger(group_uuid, task_count)
        if won and not crashed:
            crashed.append(group_uuid)
            raise RuntimeError("worker died right after winning the chord")
        return won

    server.backend.trigger_chord = trigger_then_crash  # type: ignore[method-assign]
    chord = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply"))
    with running_worker(server, concurrency=2):
        # The crashed member's message goes back to the queue; on redelivery it finds the
        # chord triggered and the callback without any state, and sends it.
        assert server.send_chord(chord).get(WAIT) == 20
    assert crashed and rec.of("multiply") == [(2, 10)]


@pytest.mark.usefixtures("fast_recovery")
def test_slow_winner_and_a_repairing_redelivered_member_send_the_callback_once(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    chord = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply"))
    trigger = server.backend.trigger_chord
    won_once = threading.Event()

    async def slow_winner(group_uuid: str, task_count: int) -> bool:
        won = await trigger(group_uuid, task_count)
        if won and not won_once.is_set():
            won_once.set()
            # Stall between winning and sending until a redelivered member has repaired the
            # "lost" callback: the winner must then not send it a second time.
            for _ in range(500):
                if run_sync(server.backend.get_state(chord.callback.uuid)) is not None:
                    break
                await asyncio.sleep(0.01)
        return won

    server.backend.trigger_chord = slow_winner  # type: ignore[method-assign]
    with running_worker(server, concurrency=4):
        result = server.send_chord(chord)
        assert won_once.wait(WAIT)
        run_sync(server.broker.publish(chord.group.signatures[0]))  # delivered a second time
        assert result.get(WAIT) == 20
    assert rec.of("multiply") == [(2, 10)]


@pytest.mark.usefixtures("fast_recovery")
def test_redelivered_member_after_the_callback_was_sent_sends_nothing(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    chord = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply"))
    with running_worker(server, concurrency=2):
        assert server.send_chord(chord).get(WAIT) == 20
        again = chord.group.signatures[0]
        run_sync(server.broker.publish(again))  # as if the broker delivered it a second time
        wait_until(lambda: len(rec.of("add")) == 3, timeout=WAIT, what="the redelivered member")
    # Leaving the block drains the worker: the member's chord check has finished.
    assert rec.of("multiply") == [(2, 10)]


def test_chain_group_and_chord_of_three(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    with running_worker(server, concurrency=4):
        chain = Chain(Signature("add", [1, 1]), Signature("add", [5, 5]), Signature("multiply", [4]))
        assert server.send_chain(chain).get(timeout=WAIT) == 48
        group = Group(Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6]))
        assert [r.get(timeout=WAIT) for r in server.send_group(group)] == [2, 4, 11]
        chord = Chord(
            [Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6])], Signature("multiply", [])
        )
        assert server.send_chord(chord).get(timeout=WAIT) == 88
    # The chain's multiply(4, 12), then the chord callback once, with results in group order.
    assert rec.of("multiply") == [(4, 12), (2, 4, 11)]


# --------------------------------------------------------------------------- Go's messages, raw


def go_messages(name: str, queue: str) -> list[str]:
    """Captured Go payloads with fresh UUIDs (reruns must not find old results) and our queue."""
    lines = (INTEROP_DIR / name).read_text().splitlines()
    text = "\n".join(line for line in lines if line.strip())
    for old in set(re.findall(r"(?:task|group|chord)_[0-9a-f-]{36}", text)):
        prefix = old.split("_", 1)[0]
        text = text.replace(old, f"{prefix}_{uuid.uuid4()}")
    return [line.replace('"RoutingKey":"machinery_tasks"', f'"RoutingKey":"{queue}"') for line in text.splitlines()]


def test_go_chain_completes_with_gos_result(deployment: Deployment, env: tuple[Server, Recorder]) -> None:
    server, rec = env
    (first,) = go_messages("redis_chain.json", deployment.queue)
    last_uuid = json.loads(first)["OnSuccess"][0]["OnSuccess"][0]["UUID"]
    deployment.track(json.loads(first)["UUID"], json.loads(first)["OnSuccess"][0]["UUID"], last_uuid)
    with running_worker(server, concurrency=2):
        deployment.push_raw(first.encode())
        assert server.result(last_uuid).get(WAIT) == 48
    assert rec.of("multiply") == [(4, 12)]  # as Go's worker published it


def test_go_immutable_chain_completes_with_gos_result(deployment: Deployment, env: tuple[Server, Recorder]) -> None:
    server, _ = env
    (first,) = go_messages("redis_immutable_chain.json", deployment.queue)
    step2 = json.loads(first)["OnSuccess"][0]["UUID"]
    deployment.track(json.loads(first)["UUID"], step2)
    with running_worker(server, concurrency=2):
        deployment.push_raw(first.encode())
        assert server.result(step2).get(WAIT) == 12  # add(5, 5, 2): Go appended despite Immutable


def test_go_group_completes(deployment: Deployment, env: tuple[Server, Recorder]) -> None:
    server, _ = env
    members = go_messages("redis_group_tasks.jsonl", deployment.queue)
    deployment.track(*(json.loads(m)["UUID"] for m in members))
    with running_worker(server, concurrency=2):
        deployment.push_raw(*(m.encode() for m in members))
        results = [server.result(json.loads(m)["UUID"]).get(WAIT) for m in members]
    assert results == [11, 2, 4]  # push order: add(5,6), add(1,1), add(2,2)


# --------------------------------------------------------------------------- helpers


def record_batches(server: Server) -> list[int]:
    """The size of every batch ``server``'s broker publishes from now on, in order."""
    sizes: list[int] = []
    publish = server.broker.publish_many

    async def spy(signatures: Any) -> None:
        batch = list(signatures)
        sizes.append(len(batch))
        await publish(batch)

    server.broker.publish_many = spy  # type: ignore[method-assign]
    return sizes


def _completed(server: Server, task_uuid: str) -> Any:
    state = run_sync(server.backend.get_state(task_uuid))
    return state if state is not None and state.is_completed() else None
