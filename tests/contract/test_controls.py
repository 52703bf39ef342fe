"""Task controls on every deployment: time limits, revoke, rate limits, unique sends, progress
and priorities. Built on the seams (the lock books turns and claims, the backend keeps
revocations and progress), so each must hold whichever drivers carry them.

No test measures a duration: limits are shown by the task's outcome, rate limits by the
booked turn (an hour apart, so no machine is slow enough to blur it), priorities by order.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone

import pytest

from machinery import FAILURE, PENDING, Server, Signature, SoftTimeLimitExceeded, TaskContext, TaskFailed
from support.deployment import Deployment
from support.waiting import WAIT, wait_until
from support.workers import running_worker


@pytest.fixture
def server(deployment: Deployment) -> Server:
    return deployment.server()


def test_a_hard_time_limit_stops_the_task_and_fails_it(server: Server) -> None:
    @server.task(time_limit=0.5)
    async def forever() -> str:
        await asyncio.sleep(3600)
        return "never"

    with running_worker(server):
        result = forever.send()
        with pytest.raises(TaskFailed, match=r"time limit of 0\.5 s exceeded"):
            result.get(timeout=WAIT)
    assert result.state().state == FAILURE


def test_a_soft_time_limit_lets_the_task_clean_up(server: Server) -> None:
    @server.task(soft_time_limit=0.3, time_limit=WAIT)
    async def tidy() -> str:
        try:
            await asyncio.sleep(3600)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "never"

    with running_worker(server):
        assert tidy.send().get(timeout=WAIT) == "cleaned up"


def test_a_revoked_task_is_not_run(server: Server) -> None:
    ran: list[int] = []

    @server.task
    def add(a: int, b: int) -> int:
        ran.append(a)
        return a + b

    revoked = add.send(1, 1)
    server.revoke(revoked.task_uuid)
    assert revoked.state().state == FAILURE  # waiters stop waiting at once
    with running_worker(server):
        assert add.send(2, 2).get(timeout=WAIT) == 4  # queued behind it: the revoked one went first
        with pytest.raises(TaskFailed, match="revoked"):
            revoked.get(timeout=WAIT)
    assert ran == [2]


def test_revoke_with_terminate_stops_a_running_task(server: Server) -> None:
    started = threading.Event()

    @server.task
    async def long() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "never"

    with running_worker(server):
        result = long.send()
        assert started.wait(WAIT)
        server.revoke(result.task_uuid, terminate=True)
        with pytest.raises(TaskFailed, match="revoked"):
            result.get(timeout=WAIT)


def test_a_rate_limited_task_books_its_turn(deployment: Deployment, server: Server) -> None:
    ran: list[int] = []

    # The rate key is the task's name: one of this test's own, as the lock may be shared.
    @server.task(name=f"scarce_{deployment.queue}", rate_limit="1/h")
    def scarce(i: int) -> int:
        ran.append(i)
        return i

    with running_worker(server):
        first = scarce.send(1)
        assert first.get(timeout=WAIT) == 1
        second = scarce.send(2)
        deployment.track_delay(datetime.now(timezone.utc) + timedelta(hours=1))
        # Its turn is an hour away: it waits for it (deferred, not run and not lost).
        wait_until(lambda: second.task_uuid not in {s.uuid for s in server.get_pending_tasks()}, what="deferral")
    assert ran == [1]
    assert second.state().state == PENDING


def test_a_unique_send_while_an_equal_one_waits_returns_that_one(deployment: Deployment, server: Server) -> None:
    # The unique key is made of the task's name and arguments: a name of this test's own.
    @server.task(name=f"add_{deployment.queue}")
    def add(a: int, b: int) -> int:
        return a + b

    one = add.send(1, 2, unique_for=600)
    two = add.send(1, 2, unique_for=600)
    other = add.send(2, 2, unique_for=600)
    assert two.task_uuid == one.task_uuid and other.task_uuid != one.task_uuid
    assert sorted(s.uuid for s in server.get_pending_tasks()) == sorted([one.task_uuid, other.task_uuid])
    with running_worker(server):
        assert (one.get(timeout=WAIT), other.get(timeout=WAIT)) == (3, 4)
    # Done (the worker has settled everything): the claim is released, and an equal send is a new task.
    again = add.send(1, 2, unique_for=600)
    assert again.task_uuid != one.task_uuid
    with running_worker(server):
        assert again.get(timeout=WAIT) == 3


def test_progress_is_readable_while_the_task_runs(server: Server) -> None:
    gate = threading.Event()

    @server.task
    def working(ctx: TaskContext) -> str:
        ctx.progress(0.5, "half way")
        assert gate.wait(WAIT)
        return "done"

    with running_worker(server):
        result = working.send()
        wait_until(lambda: result.progress() == (0.5, "half way"), what="the progress report")
        gate.set()
        assert result.get(timeout=WAIT) == "done"


@pytest.mark.known_gap("priorities")
def test_higher_priorities_are_taken_first(server: Server) -> None:
    order: list[str] = []

    @server.task
    def record(name: str) -> str:
        order.append(name)
        return name

    for name, priority in [("low-1", 0), ("high", 9), ("low-2", 0), ("mid", 5)]:
        server.send_task(Signature("record", [name], priority=priority))
    with running_worker(server, concurrency=1):
        wait_until(lambda: len(order) == 4, what="all four run")
    assert order == ["high", "mid", "low-1", "low-2"]
