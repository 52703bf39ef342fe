"""The core scenarios end to end on every deployment (``deployment``: each broker with each
result backend it is deployed with), through a worker running beside the test.

Nothing here asserts how long anything took: waits are bounded only so that a broken worker
fails the test instead of hanging it. The worker's own rules, with no broker in between, are
unit-tested in tests/unit/test_worker.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from machinery import (
    FAILURE,
    PENDING,
    STARTED,
    SUCCESS,
    Arg,
    AsyncResult,
    RetryTaskLater,
    Server,
    Signature,
    TaskContext,
    TaskFailed,
)
from support.deployment import Deployment
from support.fixtures import unique
from support.waiting import WAIT, wait_until
from support.workers import running_worker


@pytest.fixture
def server(deployment: Deployment) -> Server:
    return deployment.server()


# --------------------------------------------------------------------------- sync and async faces


def test_sync_face_with_def_and_async_def_tasks_and_result_types(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    @server.task(name="async_divmod")
    async def divide(a: int, b: int) -> tuple[int, int]:
        await asyncio.sleep(0)
        return divmod(a, b)

    @server.task
    def reverse(data: bytes) -> bytes:
        return data[::-1]

    @server.task
    async def nothing() -> None:
        return None

    with running_worker(server, concurrency=2):
        assert add.send(1, 2).get(timeout=WAIT) == 3
        assert server.send_task(Signature("add", [20, 22])).get(timeout=WAIT) == 42
        several = divide.send(7, 2)
        assert several.get(timeout=WAIT) == (3, 1)
        raw = reverse.send(b"\x00\xffab")
        assert raw.get(timeout=WAIT) == b"ba\xff\x00"
        none = nothing.send()
        assert none.get(timeout=WAIT) is None
    # What the backend stores is Go's {Type, Value} list.
    assert [r.to_wire() for r in several.state().results or []] == [
        {"Type": "int64", "Value": 3},
        {"Type": "int64", "Value": 1},
    ]
    assert [r.to_wire() for r in raw.state().results or []] == [{"Type": "[]uint8", "Value": "YmH/AA=="}]
    assert none.state().results == []


async def test_async_face(server: Server) -> None:
    @server.task
    async def multiply(a: int, b: int) -> int:
        return a * b

    @server.task
    def shout(text: str) -> tuple[str, int]:
        return text.upper(), len(text)

    @server.task
    async def raw() -> bytes:
        return b"\x01\x02"

    @server.task
    def nothing() -> None:
        return None

    with running_worker(server, concurrency=2):
        result = await server.asend_task(Signature("multiply", [6, 7]))
        assert isinstance(result, AsyncResult)
        assert await result.aget(timeout=WAIT) == 42
        assert (await result.astate()).state == SUCCESS
        assert await (await shout.asend("go")).aget(timeout=WAIT) == ("GO", 2)
        assert await (await raw.asend()).aget(timeout=WAIT) == b"\x01\x02"
        assert await (await nothing.asend()).aget(timeout=WAIT) is None
        # several waiters on one loop at once
        many = [await multiply.asend(i, i) for i in range(5)]
        assert await asyncio.gather(*(r.aget(timeout=WAIT) for r in many)) == [i * i for i in range(5)]
        with pytest.raises(TaskFailed, match="multiply takes 2 arguments, got 1"):
            await (await multiply.asend(1)).aget(timeout=WAIT)
    orphan = await server.asend_task(Signature("multiply", [1, 1]))  # no worker any more
    with pytest.raises(TimeoutError):
        await orphan.aget(timeout=0.2)
    assert (await orphan.astate()).state == PENDING
    await server.aclose()  # this loop's connections; the fixture closes the sync face's


# --------------------------------------------------------------------------- states a client sees


def test_pending_then_started_then_success(server: Server) -> None:
    release = threading.Event()

    @server.task
    def gated(a: int, b: int) -> int:
        release.wait(WAIT)
        return a + b

    result = gated.send(1, 1)
    pending = result.state()
    assert pending.state == PENDING and pending.task_name == "gated" and pending.created_at is not None
    with running_worker(server):
        wait_until(lambda: result.state().state == STARTED, what="STARTED while the task runs")
        release.set()
        assert result.get(timeout=WAIT) == 2
    final = result.state()
    assert (final.state, final.task_name, final.error) == (SUCCESS, "gated", "")
    assert [r.to_wire() for r in final.results or []] == [{"Type": "int64", "Value": 2}]
    assert final.created_at == pending.created_at  # later states keep the PENDING time


def test_failure_stores_the_exception_text(server: Server) -> None:
    @server.task
    def boom(text: str) -> None:
        raise ValueError(text)

    @server.task
    async def async_boom() -> None:
        raise RuntimeError("async oops")

    with running_worker(server):
        for result, text in [(boom.send("bad input 42"), "bad input 42"), (async_boom.send(), "async oops")]:
            with pytest.raises(TaskFailed) as info:
                result.get(timeout=WAIT)
            assert info.value.error == text and info.value.task_uuid == result.task_uuid
            state = result.state()
            assert (state.state, state.error, state.results) == (FAILURE, text, None)


def test_get_times_out_when_no_worker_runs(server: Server) -> None:
    result = server.send_task(Signature("add", [1, 2]))
    with pytest.raises(TimeoutError):
        result.get(timeout=0.3)
    assert result.state().state == PENDING


# --------------------------------------------------------------------------- retries


def test_retry_count_fails_twice_then_succeeds_under_the_same_uuid(deployment: Deployment, server: Server) -> None:
    seen: list[tuple[str, int]] = []

    @server.task
    def flaky(ctx: TaskContext) -> str:
        seen.append((ctx.task_uuid, ctx.retry_count))
        if len(seen) <= 2:
            raise RuntimeError(f"attempt {len(seen)} fails")
        return "third time lucky"

    result = server.send_task(Signature("flaky", retry_count=2))
    uuid = result.task_uuid
    with running_worker(server):
        assert result.get(timeout=WAIT) == "third time lucky"
    assert seen == [(uuid, 2), (uuid, 1), (uuid, 0)]
    # Each retry is published again under the same UUID with Go's Fibonacci timeout (1 s, 2 s) and an ETA.
    published = [(s.retry_count, s.retry_timeout, s.eta is not None) for s in deployment.events.published]
    assert published == [(2, 0, False), (1, 1, True), (0, 2, True)]
    assert result.state().state == SUCCESS
    assert deployment.waiting() == set()


@pytest.mark.known_gap("delayed_inspection")
def test_a_retry_waits_in_the_delayed_store(server: Server) -> None:
    @server.task
    def always_fails() -> None:
        raise RuntimeError("not today")

    result = server.send_task(Signature("always_fails", retry_count=1))
    looks: list[list[Signature]] = []

    def first_retry_is_delayed() -> bool:
        looks.append(server.get_delayed_tasks())
        return [s.uuid for s in looks[-1]] == [result.task_uuid]

    with running_worker(server):
        # The retry waits in the delayed store for its 1 s Fibonacci timeout.
        wait_until(first_retry_is_delayed, what="the retry in the delayed store")
        (delayed,) = looks[-1]
        assert (delayed.retry_count, delayed.retry_timeout) == (0, 1) and delayed.eta is not None
        with pytest.raises(TaskFailed, match="not today"):
            result.get(timeout=WAIT)
    assert server.get_delayed_tasks() == [] and server.get_pending_tasks() == []


def test_retry_task_later_once(server: Server) -> None:
    seen: list[int] = []

    @server.task
    async def later(ctx: TaskContext) -> str:
        seen.append(ctx.retry_count)
        if len(seen) == 1:
            raise RetryTaskLater("not yet", delay=0.2)
        return "later ok"

    with running_worker(server):
        result = server.send_task(Signature("later", retry_count=3))
        assert result.get(timeout=WAIT) == "later ok"
    assert seen == [3, 3]  # the counters are left alone
    assert result.state().state == SUCCESS


# --------------------------------------------------------------------------- delayed and pending tasks


@pytest.mark.known_gap("pending_excludes_delayed")
def test_eta_task_is_not_run_before_its_eta(server: Server) -> None:
    ran_at: list[datetime] = []

    @server.task
    def stamp() -> str:
        ran_at.append(datetime.now(timezone.utc))
        return "stamped"

    with running_worker(server):
        eta = datetime.now(timezone.utc) + timedelta(seconds=1)
        result = server.send_task(Signature("stamp", eta=eta))
        assert server.get_pending_tasks() == []
        assert result.get(timeout=WAIT) == "stamped"
    assert len(ran_at) == 1 and ran_at[0] >= eta  # ordering, not timing


@pytest.mark.known_gap("delayed_inspection")
def test_an_eta_task_waits_in_the_delayed_store(server: Server) -> None:
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    result = server.send_task(Signature("stamp", eta=eta))
    delayed = server.get_delayed_tasks()
    assert [s.uuid for s in delayed] == [result.task_uuid]
    assert delayed[0].eta == eta and delayed[0].name == "stamp"
    assert server.get_pending_tasks() == []


def test_pending_tasks_are_decoded_signatures_in_order(deployment: Deployment, server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    results = [server.send_task(Signature("add", [i, 10 * i])) for i in range(3)]
    pending = server.get_pending_tasks()
    assert all(isinstance(s, Signature) for s in pending)
    assert [s.uuid for s in pending] == [r.task_uuid for r in results]
    assert [s.args for s in pending] == [[Arg("int64", i), Arg("int64", 10 * i)] for i in range(3)]
    # The routing key the broker gives a signature naming none (Go: the binding key on a direct exchange).
    assert all(s.name == "add" and s.routing_key == server.broker.routing_key_for(s) for s in pending)
    assert server.get_pending_tasks(deployment.other_queue()) == []
    with running_worker(server):
        assert [r.get(timeout=WAIT) for r in results] == [0, 11, 22]
    assert server.get_pending_tasks() == []
    assert deployment.taken_count() == 0


# --------------------------------------------------------------------------- bad and unknown messages


def test_malformed_message_is_dead_lettered_and_can_be_requeued(deployment: Deployment, server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    queue = server.config.default_queue
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    with running_worker(server, concurrency=1):
        deployment.push_raw(b"not json")
        after = add.send(2, 3)  # queued behind the bad message
        assert after.get(timeout=WAIT) == 5
        wait_until(lambda: len(server.dead_letters()) == 1, what="dead letter")
    (letter,) = server.dead_letters()
    assert (letter.queue, letter.body) == (queue, b"not json")
    assert "not JSON" in letter.reason
    assert letter.time >= before
    assert deployment.queued_bodies() == [] and deployment.taken_count() == 0

    assert server.requeue_dead() == 1
    assert server.dead_letters() == []
    assert deployment.queued_bodies() == [b"not json"]
    with running_worker(server):  # still garbage: dead-lettered again, never lost
        wait_until(lambda: len(server.dead_letters()) == 1, what="dead letter again")
    assert deployment.queued_bodies() == [] and deployment.taken_count() == 0


def test_unregistered_task_is_requeued_and_an_ignorable_one_dropped(
    deployment: Deployment, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="machinery")

    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    requeued = deployment.events
    unknown = server.send_task(Signature("not_here", [1]))
    ignorable = server.send_task(Signature("not_here_either", ignore_when_task_not_registered=True))
    with running_worker(server, concurrency=2):
        wait_until(lambda: requeued.count("after_requeue") >= 3, what="the unknown task requeued several times")
        wait_until(lambda: f"Dropping not_here_either {ignorable.task_uuid}" in caplog.text, what="drop")
        assert add.send(1, 2).get(timeout=WAIT) == 3  # registered work goes on meanwhile
    assert {task_uuid for task_uuid, _ in requeued.of("after_requeue")} == {unknown.task_uuid}
    # Not lost: back in the queue, or waiting to go back (RabbitMQ's delay queues cannot be listed).
    wait_until(lambda: deployment.waiting() == {unknown.task_uuid}, what="the unknown task waiting again")
    assert unknown.state().state == PENDING
    assert ignorable.state().state == PENDING  # like Go: dropped without a state
    assert server.dead_letters() == [] and deployment.taken_count() == 0
    warnings = [r for r in caplog.records if "'not_here' is not registered" in r.getMessage()]
    assert len(warnings) == 1


# --------------------------------------------------------------------------- callbacks


def test_on_success_and_on_error_callbacks(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    @server.task
    def pair() -> tuple[int, str]:
        return 7, "x"

    @server.task
    def fail(text: str) -> None:
        raise ValueError(text)

    @server.task
    def record(*args: Any) -> str:
        return ",".join(repr(a) for a in args)

    ids = {name: unique("task_cb") for name in ("sum", "pair", "err", "never_ok", "never_err")}
    with running_worker(server, concurrency=2):
        ok = server.send_task(
            Signature(
                "add",
                [1, 2],
                on_success=[Signature("record", ["sum"], uuid=ids["sum"])],
                on_error=[Signature("record", uuid=ids["never_err"])],
            )
        )
        assert ok.get(timeout=WAIT) == 3
        assert server.result(ids["sum"]).get(timeout=WAIT) == "'sum',3"
        server.send_task(Signature("pair", on_success=[Signature("record", uuid=ids["pair"])]))
        assert server.result(ids["pair"]).get(timeout=WAIT) == "7,'x'"
        bad = server.send_task(
            Signature(
                "fail",
                ["boom"],
                on_error=[Signature("record", ["ctx"], uuid=ids["err"])],
                on_success=[Signature("record", uuid=ids["never_ok"])],
            )
        )
        assert server.result(ids["err"]).get(timeout=WAIT) == "'boom','ctx'"
        with pytest.raises(TaskFailed, match="boom"):
            bad.get(timeout=WAIT)
    assert server.result(ids["never_ok"]).state() is None  # never sent
    assert server.result(ids["never_err"]).state() is None
    assert server.get_pending_tasks() == []


# --------------------------------------------------------------------------- shutdown


def test_graceful_quit_finishes_the_running_task(deployment: Deployment, server: Server) -> None:
    started = threading.Event()
    release = threading.Event()

    @server.task
    def slow() -> str:
        started.set()
        release.wait(WAIT)  # a gate rather than a 1 s sleep: the quit surely comes mid-task
        time.sleep(0.1)
        return "finished"

    with running_worker(server, concurrency=1) as worker:
        result = slow.send()
        assert started.wait(WAIT)
        late = slow.send()  # not taken: the only slot is busy
        worker.quit()  # reaches the worker's loop before the task's end does
        release.set()
    # running_worker has joined the worker's thread: the worker returned after the task ended.
    assert result.state().state == SUCCESS
    assert result.get(timeout=WAIT) == "finished"
    assert deployment.taken_count() == 0
    assert [s.uuid for s in server.get_pending_tasks()] == [late.task_uuid]
    assert late.state().state == PENDING


def test_abort_returns_the_running_task_for_another_worker(deployment: Deployment, server: Server) -> None:
    started = threading.Event()
    runs: list[str] = []

    @server.task
    async def long(ctx: TaskContext) -> str:
        runs.append(ctx.task_uuid)
        if len(runs) == 1:
            started.set()
            await asyncio.sleep(60)  # cancelled by the abort
        return "done by the second worker"

    with running_worker(server, concurrency=1) as worker:
        result = long.send()
        assert started.wait(WAIT)
        worker.quit(abort=True)
    assert result.state().state == STARTED  # it never finished
    assert deployment.taken_count() == 0
    assert [s.uuid for s in server.get_pending_tasks()] == [result.task_uuid]
    with running_worker(server, concurrency=1):
        assert result.get(timeout=WAIT) == "done by the second worker"
    assert runs == [result.task_uuid] * 2
    assert server.get_pending_tasks() == [] and deployment.taken_count() == 0


# --------------------------------------------------------------------------- concurrency


def test_concurrency_bound(deployment: Deployment, server: Server) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]
    release = threading.Event()

    def enter() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])

    def leave() -> None:
        with lock:
            running[0] -= 1

    @server.task
    def hold_sync(i: int) -> int:
        enter()
        release.wait(WAIT)
        leave()
        return i

    @server.task
    async def hold_async(i: int) -> int:
        enter()
        await asyncio.to_thread(release.wait, WAIT)
        leave()
        return i

    results = [(hold_sync if i % 2 else hold_async).send(i) for i in range(6)]
    with running_worker(server, concurrency=2):
        try:
            wait_until(lambda: running[0] == 2, what="two tasks running")
            assert deployment.taken_count() == 2  # never takes more than it can start (or skips)
            assert len(server.get_pending_tasks()) == 4
        finally:
            release.set()  # a failure or a skip above must not leave the worker's tasks holding
        assert [r.get(timeout=WAIT) for r in results] == list(range(6))
    assert most[0] == 2
    assert deployment.taken_count() == 0


# --------------------------------------------------------------------------- periodic tasks


def test_the_worker_runs_a_periodic_task(server: Server) -> None:
    ticks: list[tuple[int, int]] = []

    @server.task
    def add(a: int, b: int) -> int:
        ticks.append((a, b))
        return a + b

    server.register_periodic_task("@every 1s", unique("tick"), Signature("add", [7, 7]))
    with running_worker(server, concurrency=2):  # the worker runs the scheduler beside consuming
        wait_until(lambda: len(ticks) >= 2, what="two ticks")
    assert set(ticks) == {(7, 7)}
