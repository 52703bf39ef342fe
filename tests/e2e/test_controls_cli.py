"""The task controls from the command line: ``machinery worker --pool --time-limit
--soft-time-limit --max-tasks-per-child --max-memory-per-child``, ``machinery send --priority
--time-limit --unique-for``, ``machinery revoke UUID... [--terminate]`` and what ``machinery
status`` shows of progress and tracebacks.

Every command is the installed ``machinery`` script in its own process, configured from the
environment, with ``-A support.control_procs:server`` where it needs the tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import control_tasks
from support.control_tasks import events
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parents[1]
WAIT = 60.0  # an upper bound for anything to happen; never an expectation of speed
APP = "support.control_procs:server"


def machinery_script() -> str:
    return str(Path(sys.executable).with_name("machinery"))


class Cli:
    """Runs ``machinery`` commands against one SQLite file and queue; stops its workers."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.events_path = tmp_path / "events"
        queue = f"cli_ctl_{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ,
            "BROKER": f"sqlite:///{tmp_path / 'cli.db'}",
            "DEFAULT_QUEUE": queue,
            control_tasks.EVENTS_ENV: str(self.events_path),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [machinery_script(), *args], cwd=self.tmp_path, env=self.env, capture_output=True, text=True, timeout=120
        )
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def send(self, *args: str) -> str:
        return self.run("send", "-A", APP, *args).stdout.strip()

    def status(self, task_uuid: str) -> str:
        return self.run("status", task_uuid).stdout

    def wait_for(self, task_uuid: str, state: str) -> str:
        """``machinery status`` once it shows ``state``."""
        return self.status_once(task_uuid, f"state    {state}")

    def status_once(self, task_uuid: str, text: str) -> str:
        """``machinery status`` once its output has ``text``."""

        def shown() -> str | None:
            out = self.status(task_uuid)
            return out if text in out else None

        return wait_until(shown, WAIT, f"status showing {text!r}")

    def worker(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"worker-{len(self.workers)}.log").open("wb")
        process = subprocess.Popen(
            [machinery_script(), "worker", "-A", APP, "--no-periodic", *args],
            cwd=self.tmp_path,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(process)
        wait_until(lambda: "Launching a worker" in self.log(process), WAIT, "the worker starting")
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return (self.tmp_path / f"worker-{self.workers.index(process)}.log").read_text()

    def events(self, tag: str | None = None, event: str | None = None) -> list[control_tasks.Event]:
        return events(self.events_path, tag, event)

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    made = Cli(tmp_path)
    yield made
    made.close()


def result_of(status: str) -> str:
    (line,) = [line for line in status.splitlines() if line.startswith("result")]
    return line.split(None, 1)[1]


def test_worker_pool_time_limit_and_max_tasks_per_child(cli: Cli) -> None:
    worker = cli.worker("--pool", "processes", "-c", "1", "--time-limit", "1", "--max-tasks-per-child", "2")
    hung = cli.send("hang", "h")
    out = cli.wait_for(hung, "FAILURE")
    assert "time limit of 1 s exceeded" in out
    (start,) = cli.events("h", "start")
    assert start.pid != worker.pid  # in a pool child, which the limit killed
    pids = []
    for i in range(4):
        task = cli.send("pid_of", f"n{i}")
        pids.append(result_of(cli.wait_for(task, "SUCCESS")))
    assert start.pid not in {int(p.split()[0]) for p in pids}
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]  # a new child every 2 tasks
    assert "Process pool started: 1 children" in cli.log(worker)


def test_worker_soft_time_limit(cli: Cli) -> None:
    worker = cli.worker("--pool", "processes", "-c", "1", "--soft-time-limit", "1")
    cleaned = cli.send("soft", "s")
    assert result_of(cli.wait_for(cleaned, "SUCCESS")).startswith('"cleaned up"')
    assert [e.event for e in cli.events("s")] == ["start", "cleanup"]
    assert cli.events("s")[0].pid != worker.pid


def test_worker_max_memory_per_child(cli: Cli) -> None:
    cli.worker("--pool", "processes", "-c", "1", "--max-memory-per-child", "200")
    first = result_of(cli.wait_for(cli.send("pid_of", "a"), "SUCCESS"))
    grown = result_of(cli.wait_for(cli.send("grow", "g", "300"), "SUCCESS"))
    after = result_of(cli.wait_for(cli.send("pid_of", "b"), "SUCCESS"))
    assert first == grown  # under the limit, the child was kept
    assert after != grown  # past 200 MB it was replaced


def test_worker_refuses_child_recycling_without_the_process_pool(cli: Cli) -> None:
    done = cli.run("worker", "-A", APP, "--max-tasks-per-child", "5", check=False)
    assert done.returncode != 0 and 'need pool="processes"' in done.stderr


def test_threads_pool_warns_about_time_limits(cli: Cli) -> None:
    worker = cli.worker("-c", "1", "--time-limit", "5")
    assert "need pool='processes' (--pool processes)" in cli.log(worker)


def test_send_priority_time_limit_and_unique_for(cli: Cli) -> None:
    low = cli.send("quick", "low")
    high = cli.send("quick", "high", "--priority", "9")
    middle = cli.send("quick", "middle", "--priority", "4")
    first = cli.send("quick", "once", "--unique-for", "600")
    assert cli.send("quick", "once", "--unique-for", "600") == first  # the same task, nothing sent
    limited = cli.send("hang_async", "limited", "--time-limit", "1")
    refused = cli.run("send", "-A", APP, "quick", "g", "--group", "3", "--unique-for", "600", check=False)
    assert refused.returncode != 0 and "--unique-for applies to single sends" in refused.stderr
    cli.worker("-c", "1")
    for task in (low, high, middle, first):
        cli.wait_for(task, "SUCCESS")
    assert "time limit of 1 s exceeded" in cli.wait_for(limited, "FAILURE")
    assert [e.tag for e in cli.events(event="run")] == ["high", "middle", "low", "once"]


def test_revoke_before_start_and_terminate_while_running(cli: Cli) -> None:
    skipped = [cli.send("quick", "skipped-1"), cli.send("quick", "skipped-2")]
    done = cli.run("revoke", *skipped)
    assert done.stdout.splitlines() == [f"revoked {u}" for u in skipped]
    for task in skipped:
        assert "error    revoked" in cli.status(task)
    cli.worker("--pool", "processes", "-c", "1")
    running = cli.send("hang", "running")
    (start,) = wait_until(lambda: cli.events("running", "start"), WAIT, "the task running")
    assert cli.run("revoke", "--terminate", running).stdout.strip() == f"revoked {running} (terminate)"
    assert "error    revoked" in cli.wait_for(running, "FAILURE")
    assert not cli.events("skipped-1") and not cli.events("skipped-2") and not cli.events("running", "end")
    wait_until(lambda: not os.path.exists(f"/proc/{start.pid}"), WAIT, "the child killed")


def test_status_shows_progress_while_running_and_the_traceback_of_a_failure(cli: Cli) -> None:
    cli.worker("-c", "2")
    running = cli.send("report", "p")
    shown = cli.status_once(running, "progress")
    assert "progress 50% half way" in shown and "state    STARTED" in shown
    Path(f"{cli.events_path}.p.release").touch()
    assert "progress" not in cli.wait_for(running, "SUCCESS")  # only while it runs

    failed = cli.send("fail", "f")
    out = cli.wait_for(failed, "FAILURE")
    assert "error    broken f" in out
    assert out.index("in fail") < out.index("in _deepest_step") < out.index("ValueError: broken f")
