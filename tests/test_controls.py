"""Task controls end to end on real brokers: time limits, the process pool, a real abort,
revoke, rate limits, unique sends, progress, priorities and stored tracebacks.

The tasks are in ``support.control_tasks`` and record ``<event> <tag> <pid> <time>`` lines;
worker processes are ``python -m support.control_procs worker``. Nothing here depends on how
long something took: every wait is ``wait_until`` with a generous deadline, and the rate
limit test checks an upper bound that only a broken limit can exceed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import AMQP_URL, INTEROP_DIR, REDIS_URL, require_service, running_worker, wait_until
from machinery import (
    FAILURE,
    PENDING,
    STARTED,
    SUCCESS,
    AsyncResult,
    Config,
    ConfigError,
    Server,
    Signature,
    TaskFailed,
)
from machinery._sync import run_sync
from machinery.state import TaskState
from support import control_tasks
from support.control_tasks import events

TESTS = Path(__file__).resolve().parent
WAIT = 60.0  # an upper bound for anything to happen; never an expectation of speed
GO_STATES = {"PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE"}


# --------------------------------------------------------------------------- set-up


def settings(kind: str, tmp_path: Path, queue: str) -> dict[str, str]:
    """The environment of an app on ``kind`` isolated by ``queue`` (read with Config.from_env)."""
    if kind == "memory":
        broker = f"memory://{queue}"
    elif kind == "sqlite":
        broker = f"sqlite:///{tmp_path / 'controls.db'}"
    elif kind == "redis":
        require_service("Redis", REDIS_URL, 6379)
        broker = REDIS_URL
    elif kind == "amqp":
        require_service("RabbitMQ", AMQP_URL, 5672)
        broker = AMQP_URL
    else:
        raise ValueError(kind)
    env = {
        "BROKER": broker,
        "DEFAULT_QUEUE": queue,
        "RESULTS_EXPIRE_IN": "600",
        "REDIS_DELAYED_TASKS_KEY": f"{queue}_delayed",
        "REDIS_NORMAL_TASKS_POLL_PERIOD": "200",
        "REDIS_DELAYED_TASKS_POLL_PERIOD": "100",
    }
    if kind == "amqp":
        env |= {
            "AMQP_BINDING_KEY": queue,
            "AMQP_QUEUE_DECLARE_ARGS": "x-max-priority:9",
        }
    return env


class App:
    """One test's app: its settings, a client server in this process, the events file, and the
    worker processes it started (stopped at the end by their PIDs)."""

    def __init__(self, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.queue = f"mt_ctl_{uuid.uuid4().hex[:10]}"
        self.settings = settings(kind, tmp_path, self.queue)
        self.events_path = tmp_path / "events"
        monkeypatch.setenv(control_tasks.EVENTS_ENV, str(self.events_path))  # for in-process workers too
        self.server = Server(Config.from_env(self.settings))
        control_tasks.register(self.server)
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **self.settings,
            control_tasks.EVENTS_ENV: str(self.events_path),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            **extra,
        }

    def events(self, tag: str | None = None, event: str | None = None) -> list[control_tasks.Event]:
        return events(self.events_path, tag, event)

    def send(self, name: str, *args: object, **options: object) -> AsyncResult:
        return self.server.send_task(_signature(name, list(args), **options))

    def start_worker(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """A worker process (``control_procs worker *args``), logging to ``worker-N.log``."""
        log = (self.tmp_path / f"worker-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "support.control_procs", "worker", *args],
            cwd=self.tmp_path,
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"worker-{self.processes.index(process)}.log").read_text()

    def wait_started(self, process: subprocess.Popen[bytes]) -> None:
        wait_until(lambda: "Launching a worker" in self.log(process), WAIT, "the worker process starting")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.kind in ("redis", "amqp"):  # what the test left in the shared server
            with contextlib.suppress(Exception):  # cleaning up must not hide the test's outcome
                run_sync(self.server.broker.delete_queue(self.queue))
        self.server.close()


def _signature(name: str, args: list[object], **options: object) -> Signature:
    from machinery.controls import SEND_OPTIONS, apply_send_options

    controls = {k: options.pop(k) for k in list(options) if k in SEND_OPTIONS}
    return apply_send_options(Signature(name, args, **options), controls)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until its parent reaps it: that is not running either.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # it went while we looked
        return False


def failure(result: AsyncResult) -> str:
    with pytest.raises(TaskFailed) as caught:
        result.get(timeout=WAIT)
    return caught.value.error


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], App]]:
    apps: list[App] = []

    def make(kind: str) -> App:
        app = App(kind, tmp_path, monkeypatch)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


IN_PROCESS = ["memory", "sqlite", "redis"]
CROSS_PROCESS = ["sqlite", "redis"]


# --------------------------------------------------------------------------- time limits


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_hung_async_task_is_cancelled_at_its_hard_limit(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=2, periodic=False):
        result = app.send("hang_async_limited", "a")
        assert failure(result) == "time limit of 1 s exceeded"
    assert [e.event for e in app.events("a")] == ["start", "cancelled"]
    assert app.server.result(result.task_uuid).state().state == FAILURE
    assert "in hang_async" in (result.traceback() or "")  # where it was waiting


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_hung_def_task_in_the_process_pool_has_its_child_killed(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes") as worker:
        result = app.send("hang_limited", "p")
        assert failure(result) == "time limit of 1 s exceeded"
        (start,) = app.events("p", "start")
        assert start.pid != os.getpid()  # it ran in a child
        wait_until(lambda: not alive(start.pid), WAIT, "the child to be killed")
        assert app.send("pid_of", "after").get(timeout=WAIT) not in (start.pid, os.getpid())  # a new child
        assert len(worker._pool.pids) == 1
    assert not app.events("p", "end")


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_task_over_its_limit_retries_while_it_has_retries(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=2, periodic=False):
        result = app.send("hang_async", "r", time_limit=1, retry_count=1)
        assert failure(result) == "time limit of 1 s exceeded"
    assert [e.event for e in app.events("r")] == ["start", "cancelled", "start", "cancelled"]


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_an_async_task_catches_its_soft_limit_to_clean_up(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=2, periodic=False):
        assert app.send("soft_async_limited", "s").get(timeout=WAIT) == "cleaned up"
    assert [e.event for e in app.events("s")] == ["start", "cleanup"]


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_def_task_in_the_pool_catches_its_soft_limit(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes"):
        assert app.send("soft_limited", "s").get(timeout=WAIT) == "cleaned up"
        assert app.send("soft", "per-send", soft_time_limit=1).get(timeout=WAIT) == "cleaned up"
        # async def tasks run on the worker's loop even with a process pool.
        assert app.send("soft_async_limited", "on-loop").get(timeout=WAIT) == "cleaned up"
    assert [e.event for e in app.events("s")] == ["start", "cleanup"]
    assert {e.pid for e in app.events("s")} != {os.getpid()}
    assert {e.pid for e in app.events("on-loop")} == {os.getpid()}


def test_limits_resolve_send_then_task_then_worker(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    with running_worker(app.server, concurrency=4, periodic=False, time_limit=1):
        worker_default = app.send("hang_async", "worker-default")
        send_longer = app.send("sleepy_async", "send-longer", 2, time_limit=30)  # beats the worker's 1 s
        send_shorter = app.send("hang_async_limited", "send-shorter", time_limit=2)  # beats the task's 1 s
        task_longer = app.send("sleepy_async_patient", "task-longer", 2)  # the task's 30 s beat the worker's 1 s
        assert failure(worker_default) == "time limit of 1 s exceeded"
        assert send_longer.get(timeout=WAIT) == "send-longer"
        assert failure(send_shorter) == "time limit of 2 s exceeded"
        assert task_longer.get(timeout=WAIT) == "task-longer"


def test_hard_limits_on_threads_warn_at_start_and_record_the_failure(
    make_app: Callable[[str], App], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app("sqlite")
    caplog.set_level(logging.WARNING, logger="machinery")
    with running_worker(app.server, concurrency=2, periodic=False):
        warning = [r.getMessage() for r in caplog.records if "need pool='processes'" in r.getMessage()]
        assert warning and "hang_limited" in warning[0] and "soft_limited" in warning[0]
        result = app.send("sleepy", "t", 3, time_limit=1)
        assert failure(result) == (
            "time limit of 1 s exceeded; its thread cannot be stopped and runs on (use pool='processes')"
        )
        assert "in sleepy" in (result.traceback() or "")  # where the thread was
        # What the docs say: the thread cannot be killed, it runs to its end.
        wait_until(lambda: app.events("t", "end"), WAIT, "the thread to run on to its end")
        # And a soft limit cannot be delivered to a thread: the task runs on undisturbed.
        assert app.send("sleepy", "soft-on-thread", 2, soft_time_limit=1).get(timeout=WAIT) == "soft-on-thread"
    assert app.server.result(result.task_uuid).state().state == FAILURE


def test_no_warning_without_limits_on_def_tasks(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    server = Server(Config(broker=f"memory://{uuid.uuid4().hex}", default_queue="q"))
    server.register_task("quick", control_tasks.quick)
    server.register_task("limited_async", control_tasks.hang_async, time_limit=1)
    caplog.set_level(logging.WARNING, logger="machinery")
    with running_worker(server, concurrency=1, periodic=False):
        pass
    assert not [r for r in caplog.records if "need pool='processes'" in r.getMessage()]


# --------------------------------------------------------------------------- the process pool


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_pool_child_killed_mid_task_fails_it_and_is_replaced(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes") as worker:
        result = app.send("hang", "k")
        (start,) = wait_until(lambda: app.events("k", "start"), WAIT, "the task running")
        os.kill(start.pid, signal.SIGKILL)
        assert failure(result) == f"the pool process running hang ({start.pid}) died: killed by SIGKILL"
        wait_until(lambda: worker._pool.pids and start.pid not in worker._pool.pids, WAIT, "a new child")
        assert app.send("pid_of", "after").get(timeout=WAIT) != start.pid


def test_a_pool_child_killed_mid_task_retries_it_in_a_new_child(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes"):
        result = app.send("hang_once", "k", retry_count=1)
        (start,) = wait_until(lambda: app.events("k", "start"), WAIT, "the task running")
        os.kill(start.pid, signal.SIGKILL)
        assert result.get(timeout=WAIT) == "k"
    first, second = app.events("k", "start")
    assert second.pid != first.pid and [e.pid for e in app.events("k", "end")] == [second.pid]


def test_children_are_recycled_after_max_tasks_per_child(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes", max_tasks_per_child=2):
        pids = [app.send("pid_of", f"n{i}").get(timeout=WAIT) for i in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]


def test_children_are_recycled_past_max_memory_per_child(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes", max_memory_per_child=200):
        before = [app.send("pid_of", f"n{i}").get(timeout=WAIT) for i in range(2)]
        assert before[0] == before[1]  # a child under the limit is kept
        grown = app.send("grow", "big", 300).get(timeout=WAIT)
        after = app.send("pid_of", "after").get(timeout=WAIT)
    assert grown == before[1] and after != grown


def test_a_worker_whose_pool_children_cannot_import_a_task_module_says_so(tmp_path: Path) -> None:
    # Loaded from a file the children cannot find by name (not on their sys.path).
    module_file = tmp_path / "hidden" / "made_up_tasks.py"
    module_file.parent.mkdir()
    module_file.write_text("def crunch(n: int) -> int:\n    return n * n\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("made_up_tasks", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["made_up_tasks"] = module
    try:
        spec.loader.exec_module(module)
        server = Server(Config(broker=f"memory://{uuid.uuid4().hex}", default_queue="q"))
        server.register_task("crunch", module.crunch)
        worker = server.new_worker(concurrency=1, periodic=False, pool="processes")
        with pytest.raises(ConfigError, match=r"cannot import made_up_tasks.*ModuleNotFoundError"):
            asyncio.run(worker.arun())
    finally:
        del sys.modules["made_up_tasks"]


def test_a_task_defined_in_a_function_cannot_go_to_the_pool() -> None:
    server = Server(Config(broker=f"memory://{uuid.uuid4().hex}", default_queue="q"))

    @server.task
    def local(n: int) -> int:
        return n

    worker = server.new_worker(concurrency=1, periodic=False, pool="processes")
    with pytest.raises(ConfigError, match="define it at module level"):
        asyncio.run(worker.arun())


# --------------------------------------------------------------------------- a real abort


@pytest.mark.parametrize(
    ("kind", "pool", "signum"),
    [
        ("sqlite", "threads", signal.SIGTERM),
        ("sqlite", "processes", signal.SIGINT),
        ("redis", "threads", signal.SIGINT),
        ("redis", "processes", signal.SIGTERM),
    ],
)
def test_a_second_signal_aborts_and_the_task_never_runs_twice_at_once(
    make_app: Callable[[str], App], kind: str, pool: str, signum: signal.Signals
) -> None:
    app = make_app(kind)
    result = app.send("slow", "once")
    first = app.start_worker("--pool", pool, "--concurrency", "1")
    (start,) = wait_until(lambda: app.events("once", "start"), WAIT, "the slow task running")
    first.send_signal(signum)
    wait_until(lambda: "Signal received" in app.log(first), WAIT, "the first signal seen")
    first.send_signal(signum)
    first.wait(WAIT)  # it would run on for 20 s if the abort waited for the task
    assert "Worker quit abruptly" in app.log(first)
    assert not alive(start.pid)  # the thread's process, or the pool child, is gone
    assert [s.uuid for s in app.server.get_pending_tasks()] == [result.task_uuid]

    app.start_worker("--pool", pool, "--concurrency", "1", **{control_tasks.SLOW_ENV: "0"})
    assert result.get(timeout=WAIT) == "once"
    runs = app.events("once")
    assert [e.event for e in runs] == ["start", "start", "end"]
    assert runs[1].pid != start.pid and runs[2].pid == runs[1].pid  # the first copy never ended


# --------------------------------------------------------------------------- revoke


@pytest.mark.parametrize("kind", [*CROSS_PROCESS, "amqp"])
def test_a_task_revoked_before_it_starts_is_skipped(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    if kind == "amqp":  # the queue exists once a worker has run (Go's topology)
        worker = app.start_worker()
        app.wait_started(worker)
        worker.send_signal(signal.SIGTERM)
        worker.wait(WAIT)
    revoked = app.send("quick", "revoked")
    app.server.revoke(revoked.task_uuid)
    state = app.server.result(revoked.task_uuid).state()
    assert (state.state, state.error) == (FAILURE, "revoked")  # at once: waiters stop waiting
    after = app.send("quick", "after")
    app.start_worker("--concurrency", "1")
    assert after.get(timeout=WAIT) == "after"
    assert failure(revoked) == "revoked"
    assert not app.events("revoked")


@pytest.mark.parametrize(
    ("kind", "pool", "task"),
    [
        ("sqlite", "threads", "hang_async"),
        ("redis", "threads", "hang_async"),
        ("sqlite", "processes", "hang"),
        ("redis", "processes", "hang"),
    ],
)
def test_a_running_task_revoked_with_terminate_is_stopped(
    make_app: Callable[[str], App], kind: str, pool: str, task: str
) -> None:
    app = make_app(kind)
    app.start_worker("--pool", pool, "--concurrency", "1")
    result = app.send(task, "x")
    (start,) = wait_until(lambda: app.events("x", "start"), WAIT, "the task running")
    app.server.result(result.task_uuid).revoke(terminate=True)
    assert failure(result) == "revoked"
    if pool == "processes":
        wait_until(lambda: not alive(start.pid), WAIT, "the child to be killed")
    else:
        assert [e.event for e in app.events("x")] == ["start", "cancelled"]
    assert app.send("quick", "next").get(timeout=WAIT) == "next"
    assert not app.events("x", "end")


def test_a_def_task_on_a_thread_revoked_with_terminate_fails_and_its_thread_runs_on(
    make_app: Callable[[str], App],
) -> None:
    app = make_app("sqlite")
    app.start_worker("--concurrency", "1")
    result = app.send("sleepy", "t", 3)
    wait_until(lambda: app.events("t", "start"), WAIT, "the task running")
    app.server.revoke(result.task_uuid, terminate=True)
    assert failure(result) == "revoked"
    wait_until(lambda: app.events("t", "end"), WAIT, "the thread to run on to its end")
    assert app.server.result(result.task_uuid).state().state == FAILURE


@pytest.mark.parametrize("kind", CROSS_PROCESS)
def test_a_running_task_revoked_without_terminate_finishes(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    app.start_worker("--concurrency", "1")
    result = app.send("sleepy", "r", 3)
    wait_until(lambda: app.events("r", "start"), WAIT, "the task running")
    app.server.revoke(result.task_uuid)
    assert result.get(timeout=WAIT) == "r"
    assert [e.event for e in app.events("r")] == ["start", "end"]


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_revocation_expires_with_the_results(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    app.server.config.results_expire_in = 1
    never_sent = f"task_{uuid.uuid4()}"
    app.server.revoke(never_sent, terminate=True)

    def revocations() -> dict[str, bool]:
        found = run_sync(app.server.backend.revocations(0))
        assert found is not None
        return found[1]

    assert revocations()[never_sent] is True
    wait_until(lambda: never_sent not in revocations(), WAIT, "the revocation to expire")


# --------------------------------------------------------------------------- rate limits


@pytest.mark.slow
@pytest.mark.parametrize("kind", CROSS_PROCESS)
def test_a_rate_limit_holds_across_two_worker_processes(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    workers = [app.start_worker("--concurrency", "4", **{control_tasks.RATE_ENV: "5/s"}) for _ in range(2)]
    for worker in workers:  # both consume before the first task is sent
        app.wait_started(worker)
    results = [app.send("rate_limited", f"n{i}") for i in range(50)]
    assert [r.get(timeout=WAIT) for r in results] == [f"n{i}" for i in range(50)]
    runs = sorted(e.time for e in app.events(event="run"))
    assert len(runs) == 50 and len({e.pid for e in app.events(event="run")}) == 2  # both workers ran some
    # Within any stretch of dt seconds at most burst + 5 * dt runs started (the burst is one
    # second's worth, 5; one more for the gap between a granted turn and its recorded start).
    # A slow machine only spreads them out; only a broken limit packs more in.
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            assert j - i + 1 <= 5 + 1 + 5 * (runs[j] - runs[i]), (i, j, runs[j] - runs[i])


# --------------------------------------------------------------------------- unique sends


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_a_unique_task_sent_from_ten_threads_runs_once(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    uuids: list[str] = []
    barrier = threading.Barrier(10)

    def send() -> None:
        barrier.wait()
        uuids.append(app.send("quick", "u", unique_for=600).task_uuid)

    threads = [threading.Thread(target=send) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(uuids) == 10 and len(set(uuids)) == 1
    assert [s.uuid for s in app.server.get_pending_tasks()] == uuids[:1]  # one message sent
    with running_worker(app.server, concurrency=2, periodic=False):
        assert app.server.result(uuids[0]).get(timeout=WAIT) == "u"
        assert len(app.events("u", "run")) == 1
        # Finished: the key is free again, and the next equal send is a new task.
        again = app.send("quick", "u", unique_for=600)
        assert again.task_uuid != uuids[0]
        assert again.get(timeout=WAIT) == "u"
    assert len(app.events("u", "run")) == 2


def test_a_unique_task_stays_unique_while_it_waits_to_retry(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    with running_worker(app.server, concurrency=2, periodic=False):
        # The retry waits 8 s (Fibonacci after 5), then runs 1 s: a wide window to send in.
        first = app.send("hang_async", "retrying", unique_for=600, time_limit=1, retry_count=1, retry_timeout=5)
        wait_until(lambda: app.events("retrying", "cancelled"), WAIT, "the first run stopped")
        assert app.send("hang_async", "retrying", unique_for=600).task_uuid == first.task_uuid
        assert failure(first) == "time limit of 1 s exceeded"


def test_group_members_are_never_made_unique(make_app: Callable[[str], App]) -> None:
    from machinery import Group

    app = make_app("sqlite")
    group = Group(_signature("quick", ["member"], unique_for=600), _signature("quick", ["member"], unique_for=600))
    with running_worker(app.server, concurrency=2, periodic=False):
        results = app.server.send_group(group)
        assert [r.get(timeout=WAIT) for r in results] == ["member", "member"]
    assert len(app.events("member", "run")) == 2


def test_a_unique_key_makes_different_arguments_equal(make_app: Callable[[str], App]) -> None:
    app = make_app("sqlite")
    first = app.send("quick", "a", unique_for=600, unique_key="nightly-report")
    second = app.send("quick", "b", unique_for=600, unique_key="nightly-report")
    other = app.send("quick", "a", unique_for=600)
    assert second.task_uuid == first.task_uuid != other.task_uuid


# --------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("kind", "pool"), [("sqlite", "threads"), ("redis", "threads"), ("redis", "processes"), ("amqp", "threads")]
)
def test_progress_is_read_from_another_process_while_the_task_runs(
    make_app: Callable[[str], App], kind: str, pool: str
) -> None:
    app = make_app(kind)
    app.wait_started(app.start_worker("--pool", pool, "--concurrency", "1"))
    result = app.send("report", "p")
    assert result.progress() is None or result.state().state == PENDING
    assert wait_until(result.progress, WAIT, "the progress report") == (0.5, "half way")
    assert result.state().state == STARTED
    Path(f"{app.events_path}.p.release").touch()
    assert result.get(timeout=WAIT) == "p"
    assert result.progress() == (1.0, "done")


# --------------------------------------------------------------------------- priorities


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "amqp"])
def test_higher_priorities_are_taken_first(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    if kind == "amqp":
        # The queue exists, with x-max-priority, once a worker has declared it.
        with running_worker(app.server, concurrency=1, periodic=False):
            pass
    priorities = [0, 5, 9, 1, 5, 0, 9]
    results = [app.send("quick", f"p{i}-{p}", priority=p) for i, p in enumerate(priorities)]
    with running_worker(app.server, concurrency=1, periodic=False):
        for result in results:
            result.get(timeout=WAIT)
    order = [e.tag for e in app.events(event="run")]
    expected = [f"p{i}-{p}" for i, p in sorted(enumerate(priorities), key=lambda ip: (-ip[1], ip[0]))]
    assert order == expected


def test_redis_keeps_prioritized_messages_at_the_head_of_gos_list(make_app: Callable[[str], App]) -> None:
    """What a Go worker sees: one plain list of Go Signatures, the prioritized ones first
    (highest, then oldest), which Go's BLPOP takes from the head in that order."""
    import redis

    app = make_app("redis")
    priorities = [0, 3, 9, 0, 3]
    for i, p in enumerate(priorities):
        app.send("quick", f"p{i}-{p}", priority=p)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.type(app.queue) == b"list"
        bodies = [json.loads(raw) for raw in client.lrange(app.queue, 0, -1)]
    finally:
        client.close()
    assert [b["Args"][0]["Value"] for b in bodies] == ["p2-9", "p1-3", "p4-3", "p0-0", "p3-0"]
    assert [b.get("Priority", 0) for b in bodies] == [9, 3, 3, 0, 0]


# --------------------------------------------------------------------------- tracebacks and Go's view


@pytest.mark.parametrize(
    ("kind", "pool"), [("memory", "threads"), ("sqlite", "threads"), ("redis", "processes"), ("amqp", "threads")]
)
def test_a_failure_stores_the_traceback_of_the_tasks_frames(
    make_app: Callable[[str], App], kind: str, pool: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(kind)
    caplog.set_level(logging.ERROR, logger="machinery")
    with running_worker(app.server, concurrency=1, periodic=False, pool=pool):
        result = app.send("fail", "f")
        assert failure(result) == "broken f"  # Go's Error stays the message
    trace = result.traceback()
    assert trace is not None
    assert trace.index("in fail") < trace.index("in _prepare") < trace.index("in _deepest_step")
    assert trace.rstrip().endswith("ValueError: broken f")
    assert "machinery/worker" not in trace  # starts at the task's code
    logged = [r.getMessage() for r in caplog.records if "failed: broken f" in r.getMessage()]
    assert logged and "_deepest_step" in logged[0]
    assert app.send("quick", "ok").traceback() is None


def _go_keys() -> set[str]:
    return set(json.loads((INTEROP_DIR / "backend_state_failure.json").read_text()))


def _stored_json(app: App, task_uuid: str) -> dict[str, object]:
    if app.kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            raw = client.get(task_uuid)
        finally:
            client.close()
        assert raw is not None
        return dict(json.loads(raw))
    db = sqlite3.connect(app.settings["BROKER"].removeprefix("sqlite:///"))
    try:
        (body,) = db.execute("SELECT body FROM task_states WHERE uuid = ?", (task_uuid,)).fetchone()
    finally:
        db.close()
    return dict(json.loads(body))


@pytest.mark.parametrize("kind", CROSS_PROCESS)
def test_a_go_reader_sees_only_gos_states_and_fields(make_app: Callable[[str], App], kind: str) -> None:
    app = make_app(kind)
    revoked = app.send("quick", "revoked")
    app.server.revoke(revoked.task_uuid)
    with running_worker(app.server, concurrency=2, periodic=False):
        failed = app.send("fail", "f")
        running = app.send("hang_async", "h")
        progressed = app.send("report", "p")
        wait_until(lambda: app.events("h", "start") and app.events("p", "reported"), WAIT, "tasks running")
        wait_until(progressed.progress, WAIT, "the progress report")
        stopped_running = _stored_json(app, running.task_uuid)
        stopped_progress = _stored_json(app, progressed.task_uuid)
        app.server.revoke(running.task_uuid, terminate=True)
        Path(f"{app.events_path}.p.release").touch()
        failure(failed)
        failure(running)
        progressed.get(timeout=WAIT)
    stored = {
        "revoked": _stored_json(app, revoked.task_uuid),
        "failed": _stored_json(app, failed.task_uuid),
        "terminated": _stored_json(app, running.task_uuid),
        "running": stopped_running,
        "progress-running": stopped_progress,
        "progress-done": _stored_json(app, progressed.task_uuid),
    }
    for what, body in stored.items():
        assert set(body) == _go_keys(), what
        assert body["State"] in GO_STATES, what
        TaskState.decode(json.dumps(body))  # and it decodes as Go's TaskState does
    assert (stored["revoked"]["State"], stored["revoked"]["Error"]) == (FAILURE, "revoked")
    assert (stored["terminated"]["State"], stored["terminated"]["Error"]) == (FAILURE, "revoked")
    assert (stored["failed"]["State"], stored["failed"]["Error"]) == (FAILURE, "broken f")
    assert stored["progress-done"]["State"] == SUCCESS
