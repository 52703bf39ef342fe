"""The app of the task-control tests (``test_controls*.py``): its settings on each broker, a
client in the test's process, the events its tasks record, and the worker processes it
starts (``python -m support.control_procs worker``), stopped at the end by their PIDs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machinery import AsyncResult, Config, Server, Signature, TaskFailed
from machinery._sync import run_sync
from support import control_tasks
from support.control_tasks import events
from support.services import AMQP_URL, REDIS_URL, require_service
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parents[1]
WAIT = 60.0  # an upper bound for anything to happen; never an expectation of speed


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
        return self.server.send_task(signature(name, list(args), **options))

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


def signature(name: str, args: list[object], **options: object) -> Signature:
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


def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], App]]:
    """The body of a test module's ``make_app`` fixture: makes Apps, closes them after the test."""
    made: list[App] = []

    def make(kind: str) -> App:
        app = App(kind, tmp_path, monkeypatch)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


IN_PROCESS = ["memory", "sqlite", "redis"]
CROSS_PROCESS = ["sqlite", "redis"]
