"""End-to-end scenarios any broker and backend pair must pass (the seed's examples), and a
worker process to SIGKILL, for the driver tests of the brokers that have no contract run yet."""

from __future__ import annotations

import dataclasses
import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from machinery import Chain, Chord, Config, Group, RetryTaskLater, Server, Signature, TaskFailed
from support.recording import Recorder, register_seed_tasks
from support.waiting import WAIT
from support.workers import running_worker

#: Generous: a cloud stand-in on a busy machine is slower than Redis.
CLOUD_WAIT = max(WAIT, 60.0)


def sig(name: str, *args: object, **options: object) -> Signature:
    return Signature(name, list(args), **options)  # type: ignore[arg-type]


def register(server: Server, rec: Recorder) -> None:
    """The seed's add and multiply, a task that fails until its last retry, and one that fails."""
    register_seed_tasks(server, rec)

    @server.task
    def flaky(key: str) -> str:
        rec.add("flaky", key)
        if len(rec.of("flaky")) < 3:
            raise RetryTaskLater("not yet", 0.2)
        return "done"

    @server.task
    def fail(message: str) -> int:
        rec.add("fail", message)
        raise ValueError(message)


def run_seed_scenarios(server: Server, rec: Recorder) -> None:
    """add, an ETA, retries, a chain, a group and a chord, each checked for its result."""
    with running_worker(server, concurrency=4):
        assert server.send_task(sig("add", 2, 3)).get(timeout=CLOUD_WAIT) == 5

        eta = datetime.now(timezone.utc) + timedelta(seconds=3)
        delayed = server.send_task(sig("add", 10, 10, eta=eta))
        assert delayed.get(timeout=CLOUD_WAIT) == 20
        assert rec.times("add")[-1] >= eta.timestamp(), "the ETA task ran before its ETA"

        assert server.send_task(sig("flaky", "k")).get(timeout=CLOUD_WAIT) == "done"
        assert len(rec.of("flaky")) == 3

        failing = server.send_task(sig("fail", "broken", retry_count=1, retry_timeout=1))
        with pytest.raises(TaskFailed, match="broken"):
            failing.get(timeout=CLOUD_WAIT)
        assert len(rec.of("fail")) == 2  # the run and its one retry

        chain = Chain(sig("add", 1, 1), sig("add", 5, 5), sig("multiply", 4))
        assert server.send_chain(chain).get(timeout=CLOUD_WAIT) == 48

        group = Group(sig("add", 1, 1), sig("add", 5, 5))
        assert [r.get(timeout=CLOUD_WAIT) for r in server.send_group(group, send_concurrency=0)] == [2, 10]

        chord = Chord(Group(sig("add", 1, 1), sig("add", 5, 5)), sig("multiply"))
        assert server.send_chord(chord, send_concurrency=0).get(timeout=CLOUD_WAIT) == 20


DOOMED_WORKER = textwrap.dedent(
    """
    import dataclasses, json, sys, threading, time
    import machinery
    from machinery import Config, Server

    fields = json.loads(sys.argv[1])
    sections = {f.name: f.type for f in dataclasses.fields(Config) if isinstance(fields.get(f.name), dict)}
    for name in sections:
        section_class = type(getattr(Config(), name))
        fields[name] = section_class(**fields[name])
    server = Server(Config(**fields))

    printing = threading.Lock()  # the two tasks start on two threads: one line each, whole

    @server.task("slow")
    def slow(n: int) -> int:
        with printing:
            print(f"STARTED {n}", flush=True)
        time.sleep(600)
        return n

    server.new_worker("doomed", 2).launch()
    """
)


def doomed_worker(tmp_path: Path, config: Config) -> subprocess.Popen[str]:
    """A worker process with ``config`` running ``slow`` tasks that never finish; it prints
    ``STARTED n`` when each starts."""
    script = tmp_path / "doomed_worker.py"
    script.write_text(DOOMED_WORKER)
    fields = {k: v for k, v in dataclasses.asdict(config).items() if not k.startswith("_")}
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(fields)], stdout=subprocess.PIPE, text=True, bufsize=1
    )


def read_started(process: subprocess.Popen[str], count: int, timeout: float = CLOUD_WAIT) -> list[str]:
    """Wait for ``count`` ``STARTED`` lines of the doomed worker; AssertionError naming what it
    had started if it exits, or has not started them all within ``timeout`` seconds."""
    stdout = process.stdout
    assert stdout is not None
    # Read on a thread of its own: a blocking readline cannot be given a deadline.
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in iter(stdout.readline, ""):
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    started: list[str] = []
    while len(started) < count:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            if process.poll() is not None:
                raise AssertionError(f"the doomed worker exited after {started!r}") from None
            raise AssertionError(f"the doomed worker started only {started!r} within {timeout:g} s") from None
        if line.startswith("STARTED"):
            started.append(line.strip())
    return started


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL the process (by its PID) and reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(10)
