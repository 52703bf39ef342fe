"""Chains, groups and chords without a broker in between: their wire shape (docs/wire.md §6.3, 8)
and how sends are batched and fail, on ``memory://``. End to end on every driver:
tests/contract/test_workflows.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from machinery import Chain, Chord, Group, Server, Signature
from support.configs import config_for
from support.recording import Recorder, register_workflow_tasks
from support.waiting import WAIT
from support.workers import running_worker


def make_server(tmp_path: Path, queue: str) -> tuple[Server, Recorder]:
    server = Server(config_for("memory", tmp_path, queue))
    return server, register_workflow_tasks(server)


def sig(name: str, *args: Any, **options: Any) -> Signature:
    return Signature(name, list(args), **options)


# --------------------------------------------------------------------------- building (wire shape)


def test_chain_nests_steps_through_on_success_like_go() -> None:
    first, second, third = sig("add", 1, 1), sig("add", 5, 5), sig("multiply", 4)
    chain = Chain(first, second, third)
    steps = chain.signatures
    assert all(s.uuid.startswith("task_") for s in steps)
    assert steps[0].on_success == [steps[1]] and steps[1].on_success == [steps[2]] and steps[2].on_success is None
    wire = steps[0].to_wire()
    assert wire["OnSuccess"][0]["UUID"] == steps[1].uuid
    assert wire["OnSuccess"][0]["OnSuccess"][0]["Name"] == "multiply"
    assert wire["OnSuccess"][0]["Headers"] is None  # nested steps keep null headers, as Go's
    assert first.uuid == "" and first.on_success is None  # the caller's signatures are left alone


def test_group_and_chord_fields_like_go() -> None:
    group = Group(sig("add", 1, 1), sig("add", 2, 2), sig("add", 5, 6))
    assert group.group_uuid.startswith("group_")
    assert [s.group_uuid for s in group.signatures] == [group.group_uuid] * 3
    assert [s.group_task_count for s in group.signatures] == [3, 3, 3]
    chord = Chord(group, sig("multiply"))
    assert chord.callback.uuid.startswith("chord_")
    for member in group.signatures:
        assert member.to_wire()["ChordCallback"] == chord.callback.to_wire()
    assert Group([sig("add", 1)]).signatures[0].name == "add"  # a list works too
    with pytest.raises(ValueError, match="at least one"):
        Chain()
    with pytest.raises(ValueError, match="at least one member"):
        Chord(Group(), sig("multiply"))
    with pytest.raises(ValueError, match="distinct UUIDs"):
        Group(sig("add", 1, uuid="x"), sig("add", 2, uuid="x"))


def test_publish_error_is_raised_after_the_rest_are_published(tmp_path: Path, queue_name: str) -> None:
    server, _ = make_server(tmp_path, queue_name)
    publish = server.broker.publish_many
    calls = 0

    async def flaky(signatures: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("broker hiccup")
        await publish(signatures)

    server.broker.publish_many = flaky  # type: ignore[method-assign]
    group = Group(*(sig("add", i, 1) for i in range(4)))
    with running_worker(server, concurrency=4):
        with pytest.raises(ConnectionError, match="hiccup"):
            server.send_group(group, send_concurrency=1)
        # Members 1..3 were published and run although member 0's publish failed.
        assert [server.result(u).get(WAIT) for u in group.task_uuids[1:]] == [2, 3, 4]
    server.close()


def test_large_group_is_published_in_batches(tmp_path: Path, queue_name: str) -> None:
    server, _ = make_server(tmp_path, queue_name)
    calls = record_batches(server)
    results = server.send_group(Group(*(sig("add", i) for i in range(10_000))))
    assert len(results) == 10_000
    assert sum(calls) == 10_000 and len(calls) == 10  # round trips, not messages
    assert len(server.get_pending_tasks()) == 10_000
    server.close()


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
