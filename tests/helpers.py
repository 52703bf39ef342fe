"""Plain helpers shared by the test modules: a record of what tasks did, the seed's tasks, and
the helper processes of the multi-process tests."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from machinery import Server


class Recorder:
    """Thread-safe record of what tasks saw and when, shared by the test and the worker thread.

    ``gate`` is an event tasks may block on until the test opens it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...], float]] = []
        self.gate = threading.Event()

    def add(self, name: str, *args: Any) -> None:
        with self.lock:
            self.calls.append((name, args, time.time()))

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [args for n, args, _ in self.calls if n == name]

    def times(self, name: str) -> list[float]:
        with self.lock:
            return [t for n, _, t in self.calls if n == name]


def register_seed_tasks(server: Server, rec: Recorder) -> None:
    """Register the seed's ``add`` and ``multiply`` on ``server``; each records its arguments in ``rec``."""

    @server.task
    def add(*args: int) -> int:
        rec.add("add", *args)
        return sum(args)

    @server.task
    def multiply(*args: int) -> int:
        rec.add("multiply", *args)
        product = 1
        for a in args:
            product *= a
        return product


WORKFLOW_PROCS = Path(__file__).with_name("_workflow_procs.py")  # the worker and scheduler processes


def stop_processes(processes: Iterable[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process (graceful: running tasks finish first), then wait for each; kill any
    that has not stopped within ``timeout`` seconds."""
    processes = list(processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
