"""The worker on the in-memory reference broker and backend (docs/wire.md §5-7, 14): nothing
lost, bad input settled, plain functions as tasks.

Every test has its own queue (and so its own memory:// store). Nothing here asserts how long
anything took; waits are bounded only so that a broken worker fails the test instead of hanging it.
"""

import asyncio
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from machinery import (
    FAILURE,
    PENDING,
    RECEIVED,
    RETRY,
    STARTED,
    SUCCESS,
    Arg,
    ArgumentError,
    AsyncResult,
    MachineryError,
    RetryTaskLater,
    Server,
    Signature,
    TaskContext,
    TaskFailed,
    TaskNotFoundError,
    TaskState,
    Worker,
)
from machinery._sync import run_sync
from machinery.retry import fibonacci_next
from support.configs import config_for, count_requeues, push_raw, waiting_bodies
from support.waiting import WAIT, wait_until
from support.workers import running_worker


@pytest.fixture
def server(tmp_path: Path, queue_name: str) -> Iterator[Server]:
    server = Server(config_for("memory", tmp_path, queue_name))
    yield server
    server.close()


def record_states(server: Server) -> list[tuple[str, str]]:
    """Every (task UUID, state) the backend is asked to write, in order."""
    seen: list[tuple[str, str]] = []
    original = server.backend.write_states

    async def recording(states: Any, keep_created: bool) -> None:
        seen.extend((s.task_uuid, s.state) for s in states)
        await original(states, keep_created)

    server.backend.write_states = recording  # type: ignore[method-assign]
    return seen


def states_of(seen: list[tuple[str, str]], task_uuid: str) -> list[str]:
    return [state for uuid, state in seen if uuid == task_uuid]


# --------------------------------------------------------------------------- running tasks


def test_sync_and_async_tasks(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    @server.task(name="async_multiply")
    async def multiply(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    assert add(2, 3) == 5  # still a plain function
    with running_worker(server, concurrency=2):
        assert add.send(1, 2).get(timeout=WAIT) == 3
        assert multiply.send(3, 4).get(timeout=WAIT) == 12
        state = server.result(add.send(5, 5).task_uuid)
        assert state.get(timeout=WAIT) == 10
        stored = state.state()
        assert (stored.state, stored.task_name, stored.error) == (SUCCESS, "add", "")
        assert [r.to_wire() for r in stored.results or []] == [{"Type": "int64", "Value": 10}]


def test_state_sequence_and_created_at(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    seen = record_states(server)
    result = add.send(1, 1)
    pending = result.state()
    assert pending.state == PENDING and pending.task_name == "add" and pending.created_at is not None
    with running_worker(server):
        result.get(timeout=WAIT)
    # RECEIVED is not written: this backend would store it with STARTED, where nobody can see it.
    assert states_of(seen, result.task_uuid) == [PENDING, STARTED, SUCCESS]
    assert result.state().created_at == pending.created_at  # later states keep the PENDING time


def test_received_is_written_where_a_reader_sees_each_state(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    monkeypatch.setattr(server.backend, "writes_batches_atomically", False)  # as RabbitMQ's state queues
    seen = record_states(server)
    result = add.send(1, 1)
    with running_worker(server):
        result.get(timeout=WAIT)
    assert states_of(seen, result.task_uuid) == [PENDING, RECEIVED, STARTED, SUCCESS]


@pytest.mark.parametrize(
    ("returned", "expected", "wire"),
    [
        (7, 7, [{"Type": "int64", "Value": 7}]),
        ((7, "3-4"), (7, "3-4"), [{"Type": "int64", "Value": 7}, {"Type": "string", "Value": "3-4"}]),
        (None, None, []),
        (b"hi", b"hi", [{"Type": "[]uint8", "Value": "aGk="}]),
        (2.0, 2.0, [{"Type": "float64", "Value": 2}]),
        (["f", "o"], ["f", "o"], [{"Type": "[]string", "Value": ["f", "o"]}]),
    ],
)
def test_results(server: Server, returned: Any, expected: Any, wire: list[dict[str, Any]]) -> None:
    @server.task
    def give() -> Any:
        return returned

    with running_worker(server):
        result = give.send()
        assert result.get(timeout=WAIT) == expected
    assert [r.to_wire() for r in result.state().results or []] == wire


def test_failure_stores_the_exception_text(server: Server) -> None:
    @server.task
    def boom(text: str) -> None:
        raise ValueError(text)

    @server.task
    async def async_boom() -> None:
        raise RuntimeError("async oops")

    @server.task
    def silent() -> None:
        raise KeyError()

    with running_worker(server):
        for result, text in [
            (boom.send("boom"), "boom"),
            (async_boom.send(), "async oops"),
            (silent.send(), "KeyError"),  # no message: the exception's type name
        ]:
            with pytest.raises(TaskFailed) as info:
                result.get(timeout=WAIT)
            assert info.value.error == text
            assert info.value.task_uuid == result.task_uuid
            assert isinstance(info.value, MachineryError)
            state = result.state()
            assert (state.state, state.error, state.results) == (FAILURE, text, None)


def test_result_without_go_type_fails_the_task(server: Server) -> None:
    @server.task
    def give_dict() -> dict[str, int]:
        return {"a": 1}

    with running_worker(server), pytest.raises(TaskFailed, match="has no Go type"):
        give_dict.send().get(timeout=WAIT)


# --------------------------------------------------------------------------- arguments


def test_argument_type_error_names_position_type_and_value_and_worker_goes_on(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    seen = record_states(server)
    with running_worker(server):
        bad = server.send_task(Signature("add", [1, Arg("float64", 1.5)]))
        with pytest.raises(TaskFailed) as info:
            bad.get(timeout=WAIT)
        message = info.value.error
        assert "argument 1" in message
        assert "'b'" in message
        assert "declared int" in message
        assert "float64 value 1.5" in message
        # the worker is still consuming
        assert add.send(2, 2).get(timeout=WAIT) == 4
    # conversion fails before STARTED (docs/wire.md §3.3)
    assert states_of(seen, bad.task_uuid) == [PENDING, RECEIVED, FAILURE]


def test_wire_conversion_error_uses_gos_prefix(server: Server) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    # Our client refuses to send this (a Go v2 worker would wedge on it), so push it by hand.
    with pytest.raises(ValueError, match="not a valid int64"):
        Signature("add", [Arg("int64", 1.0)])
    with running_worker(server):
        push_raw(server, b'{"UUID":"t_float_int","Name":"add","Args":[{"Type":"int64","Value":1.0}]}')
        with pytest.raises(TaskFailed) as info:
            server.result("t_float_int").get(timeout=WAIT)
    assert info.value.error.startswith("Reflect task args error: argument 0: ")
    assert "int64 needs an integer" in info.value.error


def test_arguments_are_converted_to_the_declared_types(server: Server) -> None:
    @server.task
    def describe(x: float, xs: list[float], data: bytes, flag: bool, maybe: int | None, anything) -> str:  # noqa: ANN001  # type: ignore[no-untyped-def]
        return f"{x!r} {xs!r} {data!r} {flag!r} {maybe!r} {anything!r}"

    with running_worker(server):
        result = describe.send(3, [1, 2], b"hi", True, 5, "free")
        assert result.get(timeout=WAIT) == "3.0 [1.0, 2.0] b'hi' True 5 'free'"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([1, 2, 3], "add takes 2 arguments, got 3"),
        ([1], "add takes 2 arguments, got 1"),
        ([], "add takes 2 arguments, got 0"),
    ],
)
def test_arity_errors(server: Server, args: list[int], fragment: str) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server), pytest.raises(TaskFailed) as info:
        server.send_task(Signature("add", args)).get(timeout=WAIT)
    assert fragment in info.value.error


def test_defaults_and_variadics(server: Server) -> None:
    @server.task
    def greet(name: str, greeting: str = "hello") -> str:
        return f"{greeting} {name}"

    @server.task
    def total(first: int, *rest: int) -> int:
        return first + sum(rest)

    with running_worker(server):
        assert greet.send("go").get(timeout=WAIT) == "hello go"
        assert greet.send("go", "bye").get(timeout=WAIT) == "bye go"
        assert total.send(1, 2, 3, 4).get(timeout=WAIT) == 10
        with pytest.raises(TaskFailed, match=r"greet takes 1 to 2 arguments, got 3"):
            greet.send("a", "b", "c").get(timeout=WAIT)
        with pytest.raises(TaskFailed, match=r"argument 2 of total \(parameter '\*rest'\) is declared int"):
            total.send(1, 2, "x").get(timeout=WAIT)


def test_required_keyword_only_parameter_is_refused_at_registration(server: Server) -> None:
    def task(a: int, *, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match="keyword-only parameter 'b'"):
        server.register_task("task", task)


# --------------------------------------------------------------------------- retries (docs/wire.md §7)


def test_fibonacci_next() -> None:
    assert [fibonacci_next(x) for x in (0, 1, 2, 3, 4, 5, 8, 10)] == [1, 2, 3, 5, 5, 8, 13, 13]


def test_retry_task_later_validates_delay() -> None:
    exc = RetryTaskLater("busy", timedelta(seconds=2))
    assert exc.delay == timedelta(seconds=2) and "busy" in str(exc)
    assert RetryTaskLater("x", 1.5).delay == timedelta(seconds=1.5)
    with pytest.raises(ValueError, match="negative"):
        RetryTaskLater("x", -1)


def record_publishes(server: Server, release_now: bool) -> list[tuple[str, int, int, timedelta | None]]:
    """Record (uuid, RetryCount, RetryTimeout, ETA - now) of every publish.

    With ``release_now`` the ETA is cleared after recording, so retries run at once instead of
    after their 1 s, 2 s ... backoff: the Fibonacci numbers are checked, not the waiting.
    """
    published: list[tuple[str, int, int, timedelta | None]] = []

    def handler(signature: Signature) -> None:
        ahead = None if signature.eta is None else signature.eta - datetime.now(timezone.utc)
        published.append((signature.uuid, signature.retry_count, signature.retry_timeout, ahead))
        if release_now:
            signature.eta = None

    server.set_pre_publish_handler(handler)
    return published


def test_retry_count_republishes_with_fibonacci_timeouts(server: Server) -> None:
    calls: list[int] = []

    @server.task
    def flaky(text: str) -> None:
        calls.append(1)
        raise RuntimeError(text)

    seen = record_states(server)
    published = record_publishes(server, release_now=True)
    with running_worker(server):
        result = server.send_task(Signature("flaky", ["retry me"], retry_count=2))
        with pytest.raises(TaskFailed, match="retry me"):
            result.get(timeout=WAIT)
    assert len(calls) == 3  # two retries, then the final failure
    uuid = result.task_uuid
    assert [p[:3] for p in published] == [(uuid, 2, 0), (uuid, 1, 1), (uuid, 0, 2)]
    assert published[0][3] is None
    for _, _, timeout, ahead in published[1:]:
        assert ahead is not None and timedelta(0) < ahead <= timedelta(seconds=timeout)
    assert states_of(seen, uuid) == [PENDING, STARTED, RETRY] * 2 + [PENDING, STARTED, FAILURE]


def test_retry_then_success_really_waits_for_the_eta(server: Server) -> None:
    attempts: list[int] = []

    @server.task
    def second_time_lucky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    seen = record_states(server)
    published = record_publishes(server, release_now=False)
    with running_worker(server):
        result = server.send_task(Signature("second_time_lucky", retry_count=1))
        assert result.get(timeout=WAIT) == "ok"
        retry_state_seen = states_of(seen, result.task_uuid)
    assert retry_state_seen == [PENDING, STARTED, RETRY, PENDING, STARTED, SUCCESS]
    assert [p[1:3] for p in published] == [(1, 0), (0, 1)]  # the retry went through the delayed store
    assert published[1][3] is not None


def test_retry_state_carries_no_error(server: Server) -> None:
    observed: list[TaskState] = []

    @server.task
    def fails_once(ctx: TaskContext) -> str:
        if ctx.retry_count == 1:
            raise RuntimeError("not stored on RETRY")
        observed.append(run_sync(server.backend.get_state(ctx.task_uuid)) or TaskState("", ""))
        return "done"

    server.set_pre_publish_handler(lambda s: setattr(s, "eta", None))
    with running_worker(server):
        result = server.send_task(Signature("fails_once", retry_count=1))
        assert result.get(timeout=WAIT) == "done"
    assert [s.state for s in observed] == [STARTED]


def test_retry_task_later_keeps_counters(server: Server) -> None:
    attempts: list[int] = []

    @server.task
    def later() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RetryTaskLater("not yet", timedelta(milliseconds=20))
        return "retried ok"

    seen = record_states(server)
    published = record_publishes(server, release_now=False)
    with running_worker(server):
        result = server.send_task(Signature("later", retry_count=3, retry_timeout=5))
        assert result.get(timeout=WAIT) == "retried ok"
    assert [p[1:3] for p in published] == [(3, 5), (3, 5)]  # counters unchanged
    ahead = published[1][3]
    assert ahead is not None and ahead <= timedelta(milliseconds=20)
    assert states_of(seen, result.task_uuid) == [PENDING, STARTED, RETRY, PENDING, STARTED, SUCCESS]


def test_on_error_runs_only_on_the_final_failure(server: Server) -> None:
    received: list[tuple[str, ...]] = []

    @server.task
    def failing() -> None:
        raise RuntimeError("boom")

    @server.task
    def on_error(*args: str) -> str:
        received.append(args)
        return "handled"

    server.set_pre_publish_handler(lambda s: setattr(s, "eta", None))
    with running_worker(server):
        callback = Signature("on_error", ["context"], uuid="task_on_error_cb")
        result = server.send_task(Signature("failing", retry_count=2, on_error=[callback]))
        with pytest.raises(TaskFailed):
            result.get(timeout=WAIT)
        assert server.result("task_on_error_cb").get(timeout=WAIT) == "handled"
    assert received == [("boom", "context")]  # once, error text prepended


# --------------------------------------------------------------------------- callbacks (docs/wire.md §6.3, 6.4)


@pytest.fixture
def callback_server(server: Server) -> Server:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    @server.task
    def multi() -> tuple[int, str]:
        return 7, "3-4"

    @server.task
    def record(*args: Any) -> str:
        return ",".join(repr(a) for a in args)

    @server.task
    def error_task(text: str) -> None:
        raise ValueError(text)

    return server


def test_on_success_gets_results_appended(callback_server: Server) -> None:
    server = callback_server
    with running_worker(server):
        server.send_task(Signature("add", [1, 2], on_success=[Signature("record", [10], uuid="task_cb1")]))
        assert server.result("task_cb1").get(timeout=WAIT) == "10,3"
        server.send_task(Signature("multi", on_success=[Signature("record", uuid="task_cb2")]))
        assert server.result("task_cb2").get(timeout=WAIT) == "7,'3-4'"


def test_immutable_finished_task_passes_no_results(callback_server: Server) -> None:
    server = callback_server
    with running_worker(server):
        callback = Signature("record", [10], uuid="task_cb_imm")
        server.send_task(Signature("add", [1, 2], immutable=True, on_success=[callback]))
        assert server.result("task_cb_imm").get(timeout=WAIT) == "10"


def test_immutable_callback_still_gets_results_like_go(callback_server: Server) -> None:
    # docs/wire.md §6.3 [observed]: the worker checks the *finished* task's flag, not the callback's.
    server = callback_server
    with running_worker(server):
        callback = Signature("record", [10], uuid="task_cb_flag", immutable=True)
        server.send_task(Signature("add", [1, 2], on_success=[callback]))
        assert server.result("task_cb_flag").get(timeout=WAIT) == "10,3"


def test_bytes_result_reaches_a_callback_intact(server: Server) -> None:
    @server.task
    def make() -> bytes:
        return b"hi"

    @server.task
    def take(data: bytes) -> str:
        return data.decode()

    with running_worker(server):
        server.send_task(Signature("make", on_success=[Signature("take", uuid="task_take")]))
        assert server.result("task_take").get(timeout=WAIT) == "hi"


def test_on_error_gets_the_error_text_prepended(callback_server: Server) -> None:
    server = callback_server
    published: list[Signature] = []
    server.set_pre_publish_handler(lambda s: published.append(s.copy()))
    with running_worker(server):
        on_error = Signature("record", ["ctx"], uuid="task_onerr")
        on_success = Signature("record", uuid="task_never")
        result = server.send_task(Signature("error_task", ["boom"], on_error=[on_error], on_success=[on_success]))
        assert server.result("task_onerr").get(timeout=WAIT) == "'boom','ctx'"
        with pytest.raises(TaskFailed, match="boom"):
            result.get(timeout=WAIT)
    assert server.result("task_never").state() is None  # never sent
    sent = next(s for s in published if s.uuid == "task_onerr")
    assert sent.args == [Arg("string", "boom"), Arg("string", "ctx")]
    assert sent.headers == {}  # like Go's SendTask (docs/wire.md §6.4); the broker fills RoutingKey after this hook


def test_callbacks_get_a_uuid_when_they_have_none(callback_server: Server) -> None:
    server = callback_server
    published: list[Signature] = []
    server.set_pre_publish_handler(lambda s: published.append(s.copy()))
    with running_worker(server):
        result = server.send_task(Signature("add", [1, 1], on_success=[Signature("record")]))
        result.get(timeout=WAIT)
        wait_until(lambda: len(published) == 2, what="callback publish")
        callback = published[1]
        assert callback.name == "record" and callback.uuid.startswith("task_")
        assert server.result(callback.uuid).get(timeout=WAIT) == "2"


def test_on_success_is_not_sent_on_failure_and_on_error_not_on_success(callback_server: Server) -> None:
    server = callback_server
    with running_worker(server):
        ok = server.send_task(Signature("add", [1, 1], on_error=[Signature("record", uuid="task_no_err")]))
        assert ok.get(timeout=WAIT) == 2
    assert server.get_pending_tasks() == []
    assert server.result("task_no_err").state() is None


# --------------------------------------------------------------------------- unregistered and bad messages


def test_unregistered_task_is_requeued_and_logged_once(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="machinery")
    requeued = count_requeues(server, monkeypatch)
    sent = [server.send_task(Signature("nope", [i])) for i in range(3)]
    with running_worker(server):
        wait_until(lambda: len(requeued) >= 6, what="every unknown message requeued twice")
    warnings = [r for r in caplog.records if "'nope' is not registered" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert waiting_bodies(server) == {r.task_uuid for r in sent}  # nothing lost
    assert all(r.state().state == PENDING for r in sent)


def test_unregistered_backoff_does_not_stop_registered_tasks(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    requeued = count_requeues(server, monkeypatch)
    nope = server.send_task(Signature("nope"))
    with running_worker(server):
        wait_until(lambda: len(requeued) >= 2, what="unknown message requeued")
        assert add.send(1, 2).get(timeout=WAIT) == 3
    assert waiting_bodies(server) == {nope.task_uuid}


def test_ignore_when_task_not_registered_drops_it(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="machinery")
    result = server.send_task(Signature("nope", ignore_when_task_not_registered=True))
    with running_worker(server):
        wait_until(lambda: f"Dropping nope {result.task_uuid}" in caplog.text, what="drop")
    assert server.get_pending_tasks() == []
    assert server.dead_letters() == []
    assert result.state().state == PENDING  # like Go: dropped silently, state stays PENDING
    assert "is not registered with this worker" not in caplog.text


def test_undecodable_messages_are_dead_lettered_and_the_worker_goes_on(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    bodies = [
        b"garbage",
        b"[1, 2]",
        b'{"UUID":"t_naive","Name":"add","ETA":"2020-01-01T00:00:00","Args":[{"Type":"int64","Value":5}]}',
        b'{"Name":"add","RetryCount":"2"}',
    ]
    with running_worker(server):
        push_raw(server, *bodies)
        wait_until(lambda: len(server.dead_letters()) == len(bodies), what="dead letters")
        assert add.send(2, 3).get(timeout=WAIT) == 5
    letters = server.dead_letters()
    assert [letter.body for letter in letters] == bodies
    reasons = [letter.reason for letter in letters]
    assert "not JSON" in reasons[0]
    assert "not a JSON object" in reasons[1]
    assert "ETA" in reasons[2] and "time zone" in reasons[2]
    assert "RetryCount must be an integer" in reasons[3]
    assert all(letter.queue == server.config.default_queue for letter in letters)
    assert server.result("t_naive").state() is None  # no state written for it
    assert server.get_pending_tasks() == []


def test_dead_letters_can_be_requeued(server: Server) -> None:
    with running_worker(server):
        push_raw(server, b"garbage")
        wait_until(lambda: len(server.dead_letters()) == 1, what="dead letter")
    assert server.requeue_dead() == 1
    assert server.dead_letters() == []
    with running_worker(server):  # still garbage: back to the dead letters, not lost
        wait_until(lambda: len(server.dead_letters()) == 1, what="dead letter again")


# --------------------------------------------------------------------------- concurrency


def test_concurrency_limit(server: Server) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]
    release = threading.Event()

    @server.task
    async def hold() -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        await asyncio.to_thread(release.wait, WAIT)
        with lock:
            running[0] -= 1
        return 1

    with running_worker(server, concurrency=3):
        results = [hold.send() for _ in range(10)]
        wait_until(lambda: running[0] == 3, what="three tasks running")
        assert len(server.get_pending_tasks()) == 7  # prefetch never exceeds what can run
        release.set()
        assert [r.get(timeout=WAIT) for r in results] == [1] * 10
    assert most[0] == 3


def test_sync_tasks_run_in_threads_and_do_not_block_the_loop(server: Server) -> None:
    gate = threading.Event()
    threads: list[str] = []

    @server.task
    def blocking() -> str:
        threads.append(threading.current_thread().name)
        gate.wait(WAIT)
        return "unblocked"

    @server.task
    async def quick() -> str:
        threads.append(threading.current_thread().name)
        return "quick"

    with running_worker(server, concurrency=2):
        slow = blocking.send()
        wait_until(lambda: len(threads) == 1, what="blocking task started")
        assert quick.send().get(timeout=WAIT) == "quick"
        assert slow.state().state == STARTED  # still blocked in its thread
        gate.set()
        assert slow.get(timeout=WAIT) == "unblocked"
    assert threads[0].startswith("machinery-task")
    assert threads[1] == "test-worker"  # async tasks run on the worker's loop


def test_default_concurrency(server: Server) -> None:
    import os

    assert Worker(server).concurrency == 2 * (os.cpu_count() or 1)
    assert Worker(server, concurrency=5).concurrency == 5
    assert Worker(server).queue == server.config.default_queue
    assert Worker(server, queue="other").queue == "other"


def test_custom_queue_worker(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server, queue="side_queue"):
        assert server.send_task(Signature("add", [2, 2], routing_key="side_queue")).get(timeout=WAIT) == 4
        default = add.send(1, 1)
        with pytest.raises(TimeoutError):
            default.get(timeout=0.3)
    assert [s.uuid for s in server.get_pending_tasks()] == [default.task_uuid]


# --------------------------------------------------------------------------- shutdown


def test_graceful_stop_lets_running_tasks_finish(server: Server) -> None:
    started = threading.Event()
    release = threading.Event()

    @server.task
    async def long() -> str:
        started.set()
        await asyncio.to_thread(release.wait, WAIT)
        return "finished"

    with running_worker(server) as worker:
        result = long.send()
        assert started.wait(WAIT)
        worker.quit()
        wait_until(lambda: worker._stopping is not None and worker._stopping.is_set(), what="stop requested")
        late = long.send()  # a stopping worker takes nothing new
        release.set()
    assert result.state().state == SUCCESS
    assert result.get(timeout=WAIT) == "finished"
    assert [s.uuid for s in server.get_pending_tasks()] == [late.task_uuid]


def test_abort_returns_unfinished_messages_to_the_queue(server: Server) -> None:
    started = threading.Event()

    @server.task
    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    with running_worker(server) as worker:
        result = forever.send()
        assert started.wait(WAIT)
        worker.quit(abort=True)
    pending = server.get_pending_tasks()
    assert [s.uuid for s in pending] == [result.task_uuid]
    assert result.state().state == STARTED  # it never finished


def test_quit_before_start_stops_at_once(server: Server) -> None:
    worker = server.new_worker()
    worker.quit()
    asyncio.run(asyncio.wait_for(worker.arun(), WAIT))
    assert not worker.started.is_set()


# --------------------------------------------------------------------------- hooks (docs/wire.md §14)


def test_pre_and_post_task_handlers(server: Server) -> None:
    events: list[str] = []

    @server.task
    def work(fail: bool) -> str:
        events.append("run")
        if fail:
            raise RuntimeError("failed")
        return "ok"

    server_worker_kwargs: dict[str, Any] = {}
    with running_worker(server, **server_worker_kwargs) as worker:
        worker.set_pre_task_handler(lambda s: events.append(f"pre:{s.name}:{s.args[0].value if s.args else ''}"))
        worker.set_post_task_handler(lambda s: events.append(f"post:{s.name}"))
        worker.set_error_handler(lambda exc: events.append(f"error:{exc}"))
        assert work.send(False).get(timeout=WAIT) == "ok"
        with pytest.raises(TaskFailed):
            work.send(True).get(timeout=WAIT)
        wait_until(lambda: events.count("post:work") == 2, what="post handler after the failure")
        # An argument that cannot be converted fails the task before it runs; the handlers
        # (middleware underneath) still see it taken and finished.
        with pytest.raises(TaskFailed):
            server.send_task(Signature("work", ["not a bool"])).get(timeout=WAIT)
        wait_until(lambda: len(events) == 10, what="post handler after the conversion failure")
    assert events[:7] == ["pre:work:False", "run", "post:work", "pre:work:True", "run", "error:failed", "post:work"]
    assert events[7] == "pre:work:not a bool"
    assert events[8].startswith("error:argument 0 of work (parameter 'fail') is declared bool")
    assert events[9] == "post:work"


def test_error_handler_gets_the_exception_and_replaces_the_log(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[BaseException] = []

    @server.task
    def boom() -> None:
        raise ValueError("boom")

    @server.task
    def typed(x: int) -> int:
        return x

    with running_worker(server) as worker:
        worker.set_error_handler(errors.append)
        with pytest.raises(TaskFailed):
            boom.send().get(timeout=WAIT)
        with pytest.raises(TaskFailed):
            typed.send("x").get(timeout=WAIT)
        wait_until(lambda: len(errors) == 2, what="error handler calls")
    assert type(errors[0]) is ValueError and str(errors[0]) == "boom"
    assert isinstance(errors[1], ArgumentError)
    assert "failed: boom" not in caplog.text


def test_failure_is_logged_without_an_error_handler(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    @server.task
    def boom() -> None:
        raise ValueError("boom")

    with running_worker(server):
        result = boom.send()
        with pytest.raises(TaskFailed):
            result.get(timeout=WAIT)
        wait_until(lambda: f"{result.task_uuid} failed: boom" in caplog.text, what="failure log")


def test_pre_consume_handler_pauses_fetching(server: Server) -> None:
    allowed = threading.Event()
    calls: list[Worker] = []

    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    def pre_consume(worker: Worker) -> bool:
        calls.append(worker)
        return allowed.is_set()

    worker_ref: list[Worker] = []
    with running_worker(server) as worker:
        worker_ref.append(worker)
        worker.set_pre_consume_handler(pre_consume)
        # A fetch already waiting when the handler was installed may still take one message;
        # once the handler has been consulted, no fetch is under way.
        wait_until(lambda: len(calls) >= 1, what="pre-consume consulted")
        result = add.send(1, 2)
        count = len(calls)
        wait_until(lambda: len(calls) >= count + 3, what="pre-consume consulted while paused")
        assert result.state().state == PENDING
        assert [s.uuid for s in server.get_pending_tasks()] == [result.task_uuid]
        allowed.set()
        assert result.get(timeout=WAIT) == 3
    assert calls and all(c is worker_ref[0] for c in calls)


def test_pre_publish_handler_sees_every_send(server: Server) -> None:
    seen: list[tuple[str, dict[str, str] | None]] = []
    server.set_pre_publish_handler(lambda s: seen.append((s.uuid, s.headers)))
    result = server.send_task(Signature("anything"))
    assert seen == [(result.task_uuid, {})]  # UUID and Go's empty Headers are filled before the handler


# --------------------------------------------------------------------------- TaskContext


def test_task_context_is_injected(server: Server) -> None:
    @server.task
    def sync_ctx(ctx: TaskContext, x: int) -> str:
        return f"{ctx.task_uuid}|{ctx.retry_count}|{ctx.signature.name}|{x}"

    @server.task
    async def async_ctx(ctx: TaskContext) -> str:
        return ctx.task_uuid

    with running_worker(server):
        result = server.send_task(Signature("sync_ctx", [5], retry_count=4))
        assert result.get(timeout=WAIT) == f"{result.task_uuid}|4|sync_ctx|5"
        other = async_ctx.send()
        assert other.get(timeout=WAIT) == other.task_uuid
        with pytest.raises(TaskFailed, match="sync_ctx takes 1 argument, got 2"):
            server.send_task(Signature("sync_ctx", [1, 2])).get(timeout=WAIT)


# --------------------------------------------------------------------------- AsyncResult


def test_get_times_out_when_nobody_runs_the_task(server: Server) -> None:
    result = server.send_task(Signature("add", [1, 2]))
    with pytest.raises(TimeoutError):
        result.get(timeout=0.2)
    assert result.state().state == PENDING


def test_a_task_never_sent_is_unknown_not_pending(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.result("task_never_sent").state() is None
    assert repr(server.result("task_x")) == "<AsyncResult task_x>"
    monkeypatch.setattr(server.config, "unknown_task_grace", 0.2)
    with pytest.raises(TaskNotFoundError) as info:  # instead of waiting forever
        server.result("task_never_sent").get()
    assert info.value.task_uuid == "task_never_sent"
    assert "never sent there, or its result expired" in str(info.value)
    # A sent task that is merely waiting for a worker is not "not found".
    waiting = server.send_task(Signature("add", [1, 2]))
    with pytest.raises(TimeoutError):
        waiting.get(timeout=0.5)


def test_get_raises_task_failed(server: Server) -> None:
    @server.task
    def boom() -> None:
        raise ValueError("kaput")

    with running_worker(server):
        result = boom.send()
        with pytest.raises(TaskFailed) as info:
            result.get(timeout=WAIT)
    assert info.value.error == "kaput"
    assert str(info.value) == f"task {result.task_uuid} failed: kaput"


# --------------------------------------------------------------------------- sync and async faces


async def test_async_face(server: Server) -> None:
    @server.task
    async def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server):
        result = await add.asend(1, 2)
        assert isinstance(result, AsyncResult)
        assert await result.aget(timeout=WAIT) == 3
        assert (await result.astate()).state == SUCCESS
        other = await server.asend_task(Signature("add", [2, 2]))
        assert await other.aget(timeout=WAIT) == 4


async def test_sync_face_from_a_thread_while_another_loop_runs(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    answers: list[int] = []
    with running_worker(server):
        thread = threading.Thread(target=lambda: answers.append(add.send(1, 2).get(timeout=WAIT)))
        thread.start()
        await asyncio.to_thread(thread.join, WAIT)  # this loop keeps running meanwhile
        assert answers == [3]


async def test_sync_face_from_a_running_loops_thread_pool(server: Server) -> None:
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server):
        assert await asyncio.to_thread(lambda: add.send(2, 3).get(timeout=WAIT)) == 5
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, lambda: add.send(3, 3).get(timeout=WAIT)) == 6


async def test_sync_face_inside_the_running_loop_thread(server: Server) -> None:
    # Blocking the caller's loop is the caller's choice; it must not deadlock machinery.
    @server.task
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(server):
        assert add.send(4, 4).get(timeout=WAIT) == 8


def test_sync_task_sending_and_waiting_from_the_worker_pool(server: Server) -> None:
    @server.task
    def inner(x: int) -> int:
        return x * 10

    @server.task
    def outer(x: int) -> int:
        return int(inner.send(x).get(timeout=WAIT)) + 1

    with running_worker(server, concurrency=2):
        assert outer.send(4).get(timeout=WAIT) == 41


def test_sync_call_from_a_sync_handler_answers_instead_of_deadlocking(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[object] = []

    def handler(signature: Signature) -> None:
        seen.append(server.result("task_other").state())  # sync call while this thread's loop runs send_task

    server.set_pre_publish_handler(handler)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            server.send_task(Signature("anything"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=send, daemon=True)  # so that a deadlock fails the test, not the run
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "send_task deadlocked"
    # The thread's own loop is busy, so the nested call ran on the background loop and answered.
    assert errors == [] and seen == [None]
    server.set_pre_publish_handler(None)


def test_sync_call_from_machinerys_own_loop_raises_instead_of_deadlocking(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(signature: Signature) -> None:
        server.result("task_other").state()  # sync call on the loop that runs send_task

    server.set_pre_publish_handler(handler)

    async def send_from_async_code() -> None:
        # A sync call from a running loop goes to the background loop, which runs the handler.
        await asyncio.to_thread(lambda: None)
        server.send_task(Signature("anything"))

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(send_from_async_code())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # so that a deadlock fails the test, not the run
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "send_task deadlocked machinery's loop"
    # The handler is middleware underneath: its error is logged, naming it, and the send goes on.
    assert errors == []
    (record,) = [r for r in caplog.records if "HandlerAdapter raised in before_publish" in r.getMessage()]
    assert record.exc_info is not None and "inside machinery's own loop" in str(record.exc_info[1])
    server.set_pre_publish_handler(None)
    assert server.result("task_other").state() is None  # the portal still works


# --------------------------------------------------------------------------- broker inspection


def test_pending_and_delayed_tasks_are_decoded_signatures(server: Server) -> None:
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    now = server.send_task(Signature("add", [1, 2]))
    later = server.send_task(Signature("add", [3, 4], eta=eta))
    also_now = server.send_task(Signature("add", [5, 6], eta=datetime.now(timezone.utc) - timedelta(seconds=1)))
    pending = server.get_pending_tasks()
    assert all(isinstance(s, Signature) for s in pending)
    assert [s.uuid for s in pending] == [now.task_uuid, also_now.task_uuid]
    assert pending[0].name == "add" and pending[0].args == [Arg("int64", 1), Arg("int64", 2)]
    assert pending[0].routing_key == server.config.default_queue
    assert pending[0].headers == {}
    delayed = server.get_delayed_tasks()
    assert [s.uuid for s in delayed] == [later.task_uuid]
    assert delayed[0].eta == eta.replace(microsecond=eta.microsecond)
    assert server.get_pending_tasks("other_queue") == []
