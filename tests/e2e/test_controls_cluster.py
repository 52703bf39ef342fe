"""Task controls that work across a cluster, end to end on real brokers: revoke from another
process, rate limits shared by two worker processes, unique sends, progress read from another
process, priorities on each broker, stored tracebacks, and what a Go reader sees of it all.

Nothing here depends on how long something took: every wait is ``wait_until`` with a
generous deadline, and the rate limit test checks an upper bound that only a broken limit
can exceed.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machinery import FAILURE, STARTED, SUCCESS
from machinery._sync import run_sync
from machinery.state import TaskState
from support import control_tasks
from support.control_app import CROSS_PROCESS, IN_PROCESS, WAIT, App, alive, apps, failure, signature
from support.interop import INTEROP_DIR
from support.services import REDIS_URL
from support.waiting import wait_until
from support.workers import running_worker

GO_STATES = {"PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE"}


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], App]]:
    yield from apps(tmp_path, monkeypatch)


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
    group = Group(signature("quick", ["member"], unique_for=600), signature("quick", ["member"], unique_for=600))
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
