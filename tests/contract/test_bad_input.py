"""Bad input is settled, never left taken, on every broker: malformed bodies, nested JSON,
nameless messages, unknown tasks; and a fuzz run of arbitrary bodies (issue 8)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from machinery import SUCCESS, Server, Signature, UnsupportedOperation
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


@pytest.mark.timeout(600)  # 360 tasks: a bound for a broken run on a loaded machine, not an expectation
def test_unknown_tasks_do_not_slow_the_registered_ones_behind_them(deployment: Deployment, server: Server) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    unknown = [server.send_task(Signature("nosuchtask", [i])) for i in range(deployment.scaled(160))]
    registered = deployment.scaled(200)
    with running_worker(server, concurrency=4):
        results = [add.send(i, i) for i in range(registered)]
        # Under the old worker-wide back-off this took about 108 s; the deadline is generous.
        assert [r.get(timeout=30) for r in results] == [2 * i for i in range(registered)]
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
    [
        b"not json",
        pytest.param(b"", marks=pytest.mark.known_gap("empty_bodies")),
        b"{not json",
        pytest.param(b"\xff\xfe\x00binary", marks=pytest.mark.known_gap("non_text_bodies")),
        b"[1, 2, 3]",
        b"null",
        b'"a string"',
        b"42",
    ],
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


# --------------------------------------------------------------------------- fuzz (issue 8 item 4)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: Objects shaped like a task message, with arbitrary values where a worker could trip.
MESSAGES = st.fixed_dictionaries(
    {"Name": st.sampled_from(["add", "", "nosuchtask"]) | st.none() | st.text(max_size=10)},
    optional={
        "Args": JSON
        | st.lists(
            st.fixed_dictionaries(
                {
                    "Type": st.sampled_from(["int64", "string", "float64", "[]uint8"]) | st.text(max_size=8),
                    "Value": JSON,
                }
            ),
            max_size=3,
        ),
        "Headers": JSON,
        "RetryCount": st.integers(min_value=-3, max_value=1),
        "Immutable": JSON,
        "OnSuccess": JSON,
        "GroupTaskCount": JSON,
    },
)
#: Well-formed messages whose arguments a task may still choke on.
TASKS = st.fixed_dictionaries(
    {
        "Name": st.sampled_from(["add", "nosuchtask"]),
        "Args": st.lists(
            st.fixed_dictionaries({"Type": st.sampled_from(["int64", "string", "float64", "bool"]), "Value": JSON}),
            max_size=3,
        ),
    }
)
BODIES = st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()), MESSAGES, TASKS)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples on every run and in CI
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES)
def test_arbitrary_bodies_end_completed_failed_or_dead_lettered(
    fuzz_worker: tuple[Deployment, Server], body: bytes | dict[str, Any]
) -> None:
    deployment, server = fuzz_worker
    task_uuid = ""
    if isinstance(body, dict):  # a task-like message: give it a UUID of its own to find its state by
        task_uuid = f"task_{deployment.queue}_{uuid.uuid4().hex[:8]}"
        deployment.track(task_uuid)
        body = json.dumps({**body, "UUID": task_uuid, "RoutingKey": deployment.queue}).encode()
    letters_before = sum(1 for letter in server.dead_letters() if letter.body == body)
    try:
        deployment.push_raw(body)
    except UnsupportedOperation:
        if not {"non_text_bodies", "empty_bodies"} & set(deployment.broker.gaps):
            raise
        reject()  # a body this broker cannot carry (and no client can send it)

    def outcome() -> str:
        dead = [letter for letter in server.dead_letters() if letter.body == body]
        state = server.result(task_uuid).state() if task_uuid else None
        completed = state is not None and state.is_completed()
        if len(dead) > letters_before:
            assert not completed, f"{body!r} was both dead-lettered and completed"
            assert dead[-1].reason, f"{body!r} was dead-lettered without a reason"
            return "dead letter"
        if completed:
            assert state is not None
            assert state.state == SUCCESS or state.error, f"{body!r} failed without an error"
            return state.state
        return ""

    event(wait_until(outcome, what=f"{body!r} settled (completed, FAILURE or dead letter)"))
    # ... and the worker goes on serving good tasks meanwhile.
    assert server.send_task(Signature("add", [1, 2])).get(timeout=WAIT) == 3


@pytest.fixture
def fuzz_worker(deployment: Deployment) -> Iterator[tuple[Deployment, Server]]:
    # Unknown task names are dead-lettered after half a second, so that they too end settled.
    server = deployment.server(unregistered_task_timeout=0.5)

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    with running_worker(server, concurrency=2):
        yield deployment, server
    assert deployment.taken_count() == 0  # nothing left taken behind
