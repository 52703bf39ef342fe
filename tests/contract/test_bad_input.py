"""Bad input is settled, never left taken, on every broker: malformed bodies, nested JSON,
nameless messages, unknown tasks; and a fuzz run of arbitrary bodies (issue 8)."""

from __future__ import annotations

import logging

import pytest

from machinery import Server, Signature
from support.deployment import Deployment
from support.waiting import WAIT, wait_until
from support.workers import running_worker

NESTED = b"[" * 10_000 + b"]" * 10_000


@pytest.fixture
def server(broker_deployment: Deployment) -> Server:
    return broker_deployment.server()


@pytest.fixture
def deployment(broker_deployment: Deployment) -> Deployment:
    return broker_deployment


@pytest.mark.parametrize(
    "body",
    [
        NESTED,
        b'{"Name":"add","Args":' + NESTED + b"}",
        b'{"Name":"add","Headers":{"a":' + NESTED + b"}}",
    ],
    ids=["nested-array", "nested-args", "nested-header"],
)
def test_deeply_nested_json_is_dead_lettered_and_inspection_survives_it(
    deployment: Deployment, server: Server, body: bytes
) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    deployment.push_raw(body)
    assert server.get_pending_tasks() == []  # listed as nothing, not a crash
    with running_worker(server, concurrency=1):
        wait_until(lambda: server.dead_letters(), what="the nested message dead-lettered")
        assert add.send(1, 2).get(timeout=WAIT) == 3
    (letter,) = server.dead_letters()
    assert letter.body == body
    assert "recursion" in letter.reason.lower() or "deep" in letter.reason.lower()


@pytest.mark.parametrize(
    "body",
    [b'{"UUID":"task_nameless"}', b'{"UUID":"task_nameless","Name":null}', b'{"UUID":"task_nameless","Name":""}'],
    ids=["missing", "null", "empty"],
)
def test_a_message_without_a_name_is_dead_lettered_as_malformed(
    deployment: Deployment, server: Server, body: bytes
) -> None:
    deployment.push_raw(body)
    with running_worker(server, concurrency=1):
        wait_until(lambda: server.dead_letters(), what="the nameless message dead-lettered")
    (letter,) = server.dead_letters()
    assert letter.body == body and "names no task" in letter.reason
    assert server.get_pending_tasks() == []


def test_unknown_tasks_do_not_slow_the_registered_ones_behind_them(deployment: Deployment, server: Server) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    unknown = [server.send_task(Signature("nosuchtask", [i])) for i in range(160)]
    with running_worker(server, concurrency=4):
        results = [add.send(i, i) for i in range(200)]
        # Under the old worker-wide back-off this took about 108 s; the deadline is generous.
        assert [r.get(timeout=30) for r in results] == [2 * i for i in range(200)]
    # Someone else's tasks: left for them, not lost (back in the queue, or waiting to go back).
    expected = {r.task_uuid for r in unknown}
    wait_until(lambda: deployment.waiting() == expected, what="every unknown task waiting again")


def test_an_unknown_task_is_dead_lettered_after_the_configured_time(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="machinery")
    strict = deployment.server(unregistered_task_timeout=0.5)
    result = strict.send_task(Signature("nosuchtask", [1]))
    with running_worker(strict, concurrency=1):
        wait_until(lambda: strict.dead_letters(), what="the unknown task dead-lettered")
    (letter,) = strict.dead_letters()
    assert Signature.decode(letter.body).uuid == result.task_uuid
    assert "not registered on any worker that saw it" in letter.reason
    assert strict.get_pending_tasks() == []
    warnings = [r for r in caplog.records if "is not registered with this worker" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per requeue


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"{not json", b"\xff\xfe\x00binary", b"[1, 2, 3]", b"null", b'"a string"', b"42"],
    ids=["text", "empty", "broken-json", "binary", "array", "null", "string", "number"],
)
def test_a_malformed_body_is_dead_lettered_with_its_reason(deployment: Deployment, server: Server, body: bytes) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server, concurrency=1):
        deployment.push_raw(body)
        assert add.send(3, 4).get(timeout=WAIT) == 7  # still consuming, behind the bad message
        wait_until(lambda: server.dead_letters(), what="the dead letter")
    (letter,) = server.dead_letters()
    assert (letter.queue, letter.body) == (deployment.queue, body)
    assert letter.reason
    assert deployment.queued_bodies() == [] and deployment.taken_count() == 0
    assert server.dead_letters() == [letter]  # inspecting leaves them in place
