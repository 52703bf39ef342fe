"""Task controls end to end on real brokers: time limits, the process pool and a real abort
(revoke, rate limits, unique sends, progress, priorities and tracebacks are in
``test_controls_cluster.py``).

The tasks are in ``support.control_tasks`` and record ``<event> <tag> <pid> <time>`` lines;
worker processes are ``python -m support.control_procs worker``. Nothing here depends on how
long something took: every wait is ``wait_until`` with a generous deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machinery import FAILURE, Config, ConfigError, Server
from support import control_tasks
from support.control_app import IN_PROCESS, WAIT, App, alive, apps, failure
from support.waiting import wait_until
from support.workers import running_worker


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], App]]:
    yield from apps(tmp_path, monkeypatch)


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
    # The worker itself is over the limit: its children's memory is theirs alone, not counted
    # from the process they were spawned by.
    worker_ballast = b"x" * (250 * 1024 * 1024)
    with running_worker(app.server, concurrency=1, periodic=False, pool="processes", max_memory_per_child=200):
        before = [app.send("pid_of", f"n{i}").get(timeout=WAIT) for i in range(2)]
        assert before[0] == before[1]  # a child under the limit is kept
        grown = app.send("grow", "big", 300).get(timeout=WAIT)
        after = app.send("pid_of", "after").get(timeout=WAIT)
    del worker_ballast
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
