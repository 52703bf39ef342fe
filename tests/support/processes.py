"""Helper processes (``support.procs``) started by a test and stopped by the PID it recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from machinery import Config

from .procs import READY, config_json
from .waiting import WAIT

TESTS_DIR = Path(__file__).resolve().parent.parent


class Helper:
    """One running helper: its process, the lines it printed (READY aside) and its log file."""

    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self.process = process
        self.log = log
        self.ready = threading.Event()
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.rstrip("\n") == READY:
                self.ready.set()
                continue
            with self._lock:
                self._lines.append(line.rstrip("\n"))
        self.ready.set()  # ended before saying READY: let the waiter see it died

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> list[str]:
        """What it printed so far, one entry per line."""
        with self._lock:
            return list(self._lines)

    def alive(self) -> bool:
        return self.process.poll() is None


class Processes:
    """Starts ``python -m support.procs`` helpers for one test and makes sure none outlives it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Helper] = []

    def start(self, mode: str, config: Config, *args: object, wait_ready: bool = True) -> Helper:
        """Start a helper in ``mode`` on ``config`` and (by default) wait for its READY line."""
        log = self.tmp_path / f"{mode}-{len(self.started)}.log"
        with log.open("w") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "support.procs", mode, config_json(config), *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=TESTS_DIR,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        helper = Helper(process, log)
        self.started.append(helper)
        if wait_ready:
            self.wait_ready(helper)
        return helper

    def start_many(self, count: int, mode: str, config: Config, *args: object) -> list[Helper]:
        """``count`` helpers started together, then each waited for (they start in parallel)."""
        helpers = [self.start(mode, config, *args, wait_ready=False) for _ in range(count)]
        for helper in helpers:
            self.wait_ready(helper)
        return helpers

    def wait_ready(self, helper: Helper) -> None:
        assert helper.ready.wait(WAIT * 2), f"helper {helper.pid} said nothing within {WAIT * 2} s\n{self.logs()}"
        assert helper.alive() or helper.process.returncode == 0, f"helper {helper.pid} died\n{self.logs()}"

    def output(self, helper: Helper, timeout: float = WAIT) -> list[str]:
        """Wait for the helper to exit by itself (it must succeed) and return what it printed."""
        helper.process.wait(timeout)
        helper._reader.join(timeout)
        assert helper.process.returncode == 0, f"helper failed ({helper.process.returncode})\n{self.logs()}"
        return helper.lines()

    def stop(self, helpers: Helper | Sequence[Helper], timeout: float = WAIT) -> None:
        """SIGTERM (a worker drains: running tasks finish), then wait; SIGKILL any still running."""
        group = [helpers] if isinstance(helpers, Helper) else list(helpers)
        for helper in group:
            if helper.alive():
                helper.process.send_signal(signal.SIGTERM)
        for helper in group:
            try:
                helper.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(helper)

    def kill(self, helper: Helper) -> None:
        """SIGKILL, as a crash would, and reap it."""
        if helper.alive():
            os.kill(helper.pid, signal.SIGKILL)
        helper.process.wait(WAIT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp_path.glob("*.log")))

    def close(self) -> None:
        """Kill (by PID) every helper still running and close its pipe."""
        for helper in self.started:
            self.kill(helper)
            helper._reader.join(WAIT)
            if helper.process.stdout is not None:
                helper.process.stdout.close()


def stop_processes(processes: Sequence[subprocess.Popen[Any]], timeout: float = WAIT) -> None:
    """SIGTERM every process (graceful: running tasks finish first), then wait for each; kill
    any that has not stopped within ``timeout`` seconds. For processes a test started itself
    with ``subprocess.Popen`` (the installed ``machinery`` script, a Prometheus)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
