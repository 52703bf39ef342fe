"""The second signal stops a worker now: no task of it keeps running once its message is back."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parent


def machinery_script() -> str:
    import sys

    return str(Path(sys.executable).with_name("machinery"))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        **os.environ,
        "BROKER": f"sqlite:///{tmp_path / 'abort.db'}",
        "DEFAULT_QUEUE": "abort_q",
        "MARKER_FILE": str(tmp_path / "marker"),
        "PYTHONPATH": str(TESTS),
    }


def records(env: dict[str, str]) -> list[tuple[str, str, int]]:
    path = Path(env["MARKER_FILE"])
    if not path.exists():
        return []
    return [(e, t, int(p)) for e, t, p in (line.split() for line in path.read_text().splitlines())]


def start_worker(env: dict[str, str], tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [machinery_script(), "worker", "-A", "apps.slow_tasks:server", "-c", "2", "--no-periodic"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_a_second_signal_ends_the_process_once_the_messages_are_back(env: dict[str, str], tmp_path: Path) -> None:
    client = Server(Config(broker=env["BROKER"], default_queue="abort_q"))
    result = client.send_task(Signature("slow", ["the-task"]))
    first = start_worker(env, tmp_path, "first")
    try:
        wait_until(lambda: records(env), timeout=30, what="the slow task running")
        first.send_signal(signal.SIGTERM)
        # (Two signals sent at once would merge into one: send the second once the first is seen.)
        wait_until(lambda: "Signal received" in (tmp_path / "first.log").read_text(), what="the first signal seen")
        first.send_signal(signal.SIGTERM)
        # It would run on for SLOW_SECONDS (20 s) if the process waited for the task's thread.
        assert first.wait(timeout=15) == 1
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    log = (tmp_path / "first.log").read_text()
    assert "Worker quit abruptly" in log and "Ending the process: 1 task thread(s)" in log, log
    assert [s.uuid for s in client.get_pending_tasks()] == [result.task_uuid]  # back before the exit

    second = start_worker({**env, "SLOW_SECONDS": "0"}, tmp_path, "second")
    try:
        assert result.get(timeout=30) == "the-task"
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    client.close()
    (started_first, *rest) = records(env)
    assert started_first == ("start", "the-task", first.pid)
    assert rest == [("start", "the-task", second.pid), ("end", "the-task", second.pid)]  # never twice at once
