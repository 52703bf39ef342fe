"""The middleware seam: hook order, outcomes, failures, context, and the README's example.

Every test runs a real worker on the in-memory broker and backend, in the test's own loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from examples.outcomes import CountOutcomes

from machinery import (
    FAILURE,
    RETRY,
    SUCCESS,
    Config,
    Middleware,
    Outcome,
    RetryTaskLater,
    Server,
    Signature,
    TaskFailed,
    Worker,
)

WAIT = 30.0  # an upper bound for anything to happen, never an expectation of speed


def new_server(*middleware: Middleware) -> Server:
    queue = f"mw_{uuid.uuid4().hex[:10]}"
    return Server(Config(broker=f"memory://{queue}", default_queue=queue), middleware=middleware)


@asynccontextmanager
async def running(server: Server, **options: Any) -> AsyncIterator[Worker]:
    """A worker of ``server`` running in this loop for the duration of the block."""
    worker = server.new_worker(concurrency=4, periodic=False, **options)
    run = asyncio.create_task(worker.arun())
    while not worker.started.is_set():
        if run.done():
            run.result()  # the worker failed to start: raise its error here
        await asyncio.sleep(0.01)
    try:
        yield worker
    finally:
        worker.quit()
        await asyncio.wait_for(run, WAIT)


async def eventually(condition: Any, what: str) -> None:
    """Wait (generously) until ``condition()`` is true."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {WAIT} s")
        await asyncio.sleep(0.01)


class Recording(Middleware):
    """Records ``<name>.<hook>`` for every hook, into a list shared by several middleware."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls
        self.outcomes: list[Outcome] = []

    def _note(self, hook: str) -> None:
        self.calls.append(f"{self.name}.{hook}")

    def before_publish(self, signature: Signature) -> None:
        self._note("before_publish")

    def after_publish(self, signature: Signature) -> None:
        self._note("after_publish")

    def before_process(self, signature: Signature) -> None:
        self._note("before_process")

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._note("after_process")

    def after_ack(self, signature: Signature) -> None:
        self._note("after_ack")

    def worker_boot(self, worker: Any) -> None:
        self._note("worker_boot")

    def worker_shutdown(self, worker: Any) -> None:
        self._note("worker_shutdown")


def hooks_of(calls: list[str], hook: str) -> list[str]:
    return [call.split(".")[0] for call in calls if call.endswith("." + hook)]


async def test_before_hooks_run_in_order_and_after_hooks_in_reverse() -> None:
    calls: list[str] = []
    server = new_server(Recording("a", calls), Recording("b", calls))
    server.add_middleware(Recording("c", calls))
    add = server.task(name="add")(lambda x, y: x + y)
    async with running(server):
        result = await add.asend(1, 2)
        assert await result.aget(timeout=WAIT) == 3
        await eventually(lambda: len(hooks_of(calls, "after_ack")) == 3, "three after_ack calls")
    for hook in ("before_publish", "before_process", "worker_boot"):
        assert hooks_of(calls, hook) == ["a", "b", "c"], hook
    for hook in ("after_publish", "after_process", "after_ack", "worker_shutdown"):
        assert hooks_of(calls, hook) == ["c", "b", "a"], hook
    # One task's life, in the order the module docstring promises.
    life = [call.split(".")[1] for call in calls if call.startswith("a.")]
    assert life == [
        "worker_boot",
        "before_publish",
        "after_publish",
        "before_process",
        "after_process",
        "after_ack",
        "worker_shutdown",
    ]


async def test_async_hooks_are_awaited() -> None:
    seen: list[str] = []

    class AsyncHooks(Middleware):
        async def before_process(self, signature: Signature) -> None:
            await asyncio.sleep(0)
            seen.append("before " + signature.name)

        async def after_process(self, signature: Signature, outcome: Outcome) -> None:
            await asyncio.sleep(0)
            seen.append(f"after {signature.name} {outcome.state}")

    server = new_server(AsyncHooks())
    echo = server.task(name="echo")(lambda value: value)
    async with running(server):
        assert await (await echo.asend("x")).aget(timeout=WAIT) == "x"
        await eventually(lambda: len(seen) == 2, "both async hooks")
    assert seen == ["before echo", "after echo SUCCESS"]


async def test_outcome_of_success_failure_and_retry() -> None:
    recorder = Recording("r", [])
    server = new_server(recorder)
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RetryTaskLater("not yet", delay=0.05)
        return "done"

    def broken() -> None:
        raise ValueError("broken on purpose")

    add_task = server.task(name="add")(lambda x, y: x + y)
    flaky_task = server.task(name="flaky")(flaky)
    broken_task = server.task(name="broken")(broken)
    async with running(server):
        assert await (await add_task.asend(1, 2)).aget(timeout=WAIT) == 3
        assert await (await flaky_task.asend()).aget(timeout=WAIT) == "done"
        with pytest.raises(TaskFailed, match="broken on purpose"):
            await (await broken_task.asend()).aget(timeout=WAIT)
        await eventually(lambda: len(recorder.outcomes) == 4, "four outcomes")

    by_state = {outcome.state: outcome for outcome in recorder.outcomes}
    assert sorted(o.state for o in recorder.outcomes) == sorted([SUCCESS, SUCCESS, RETRY, FAILURE])
    success = next(o for o in recorder.outcomes if o.state == SUCCESS and o.results == [3])
    assert success.error == "" and success.retry_in is None and isinstance(success.duration, float)
    retry = by_state[RETRY]
    assert retry.results == [] and retry.retry_in is not None and retry.retry_in >= 0
    failure = by_state[FAILURE]
    assert "broken on purpose" in failure.error and failure.results == []
    assert isinstance(failure.exception, ValueError)


async def test_a_raising_middleware_is_logged_by_name_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    class Broken(Middleware):
        def before_process(self, signature: Signature) -> None:
            raise RuntimeError("middleware bug")

        async def after_process(self, signature: Signature, outcome: Outcome) -> None:
            raise RuntimeError("async middleware bug")

    recorder = Recording("after", calls)
    server = new_server(Broken(), recorder)
    add = server.task(name="add")(lambda x, y: x + y)
    with caplog.at_level(logging.ERROR, logger="machinery"):
        async with running(server):
            results = [await add.asend(i, i) for i in range(5)]
            assert [await r.aget(timeout=WAIT) for r in results] == [0, 2, 4, 6, 8]
            await eventually(lambda: len(hooks_of(calls, "after_ack")) == 5, "every message acked")
    # The middleware after the broken one still ran for every task.
    assert len(hooks_of(calls, "after_process")) == 5
    messages = [r.getMessage() for r in caplog.records]
    assert any("Broken" in m and "before_process" in m for m in messages)
    assert any("Broken" in m and "after_process" in m for m in messages)


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_a_context_variable_set_in_before_process_is_seen_by_the_task(kind: str) -> None:
    current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="unset")
    seen_after: list[str] = []

    class SetsContext(Middleware):
        def before_process(self, signature: Signature) -> None:
            current.set("set for " + signature.uuid)

        def after_process(self, signature: Signature, outcome: Outcome) -> None:
            seen_after.append(current.get())

    server = new_server(SetsContext())
    if kind == "async":

        async def read_async() -> str:
            return current.get()

        server.task(name="read")(read_async)
    else:

        def read_sync() -> str:
            return current.get()

        server.task(name="read")(read_sync)
    async with running(server):
        result = await server.asend_task(Signature("read"))
        assert await result.aget(timeout=WAIT) == "set for " + result.task_uuid
        await eventually(lambda: seen_after, "after_process")
    assert seen_after == ["set for " + result.task_uuid]


async def test_requeue_and_dead_letter_hooks() -> None:
    requeued: list[str] = []
    dead: list[tuple[bytes, str]] = []

    class Settles(Middleware):
        def after_requeue(self, signature: Signature) -> None:
            requeued.append(signature.name)

        def after_dead_letter(self, body: bytes, reason: str) -> None:
            dead.append((body, reason))

    server = new_server(Settles())
    queue = server.config.default_queue
    async with running(server):
        await server.broker._push([(queue, b"this is not json")])
        await server.broker._push([(queue, b'{"UUID": "task_x", "Name": "nosuch_task", "Args": []}')])
        await eventually(lambda: dead and requeued, "a dead letter and a requeue")
    assert dead[0][0] == b"this is not json" and dead[0][1]
    assert requeued[0] == "nosuch_task"


async def test_before_publish_may_set_headers_the_worker_sees() -> None:
    seen: list[dict[str, str] | None] = []

    class Stamps(Middleware):
        def before_publish(self, signature: Signature) -> None:
            signature.headers = {**(signature.headers or {}), "stamp": "from the client"}

        def before_process(self, signature: Signature) -> None:
            seen.append(signature.headers)

    server = new_server(Stamps())
    echo = server.task(name="echo")(lambda value: value)
    async with running(server):
        assert await (await echo.asend(1)).aget(timeout=WAIT) == 1
    assert seen and seen[0] is not None and seen[0]["stamp"] == "from the client"


async def test_go_style_handlers_are_adapters_over_the_stack() -> None:
    published: list[str] = []
    before: list[str] = []
    after: list[str] = []
    server = new_server()
    server.set_pre_publish_handler(lambda signature: published.append(signature.name))
    echo = server.task(name="echo")(lambda value: value)
    async with running(server) as worker:
        worker.set_pre_task_handler(lambda signature: before.append(signature.name))
        worker.set_post_task_handler(lambda signature: after.append(signature.name))
        assert await (await echo.asend(1)).aget(timeout=WAIT) == 1
        await eventually(lambda: after, "the post-task handler")
    assert published == ["echo"] and before == ["echo"] and after == ["echo"]


def test_only_middleware_is_accepted() -> None:
    with pytest.raises(TypeError, match=r"machinery\.Middleware"):
        new_server(object())  # type: ignore[arg-type]


async def test_the_readme_example_counts_outcomes() -> None:
    counting = CountOutcomes()
    server = new_server(counting)
    add = server.task(name="add")(lambda x, y: x + y)

    def fails() -> None:
        raise ValueError("no")

    fail = server.task(name="fails")(fails)
    async with running(server):
        for i in range(3):
            assert await (await add.asend(i, 1)).aget(timeout=WAIT) == i + 1
        with pytest.raises(TaskFailed):
            await (await fail.asend()).aget(timeout=WAIT)
        await server.broker._push([(server.config.default_queue, b"\xff")])
        await eventually(lambda: counting.dead_letters == 1, "the dead letter")
        await eventually(lambda: sum(counting.counts.values()) == 4, "four outcomes")
    assert counting.counts == {("add", SUCCESS): 3, ("fails", FAILURE): 1}
