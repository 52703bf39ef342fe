"""Tasks for the task-control tests, at module level so that pool children and worker processes
import them by name.

Each task appends ``<event> <tag> <pid> <time>`` lines to the file named by ``$CONTROL_EVENTS``
(one ``write`` of one line in append mode, so lines of several processes never mix), and the
tests read them back with ``events``. ``register`` puts every task on a server, some of them
twice with controls declared at registration.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from machinery import Server, SoftTimeLimitExceeded, TaskContext

EVENTS_ENV = "CONTROL_EVENTS"
#: How long ``slow`` takes; a test's second worker sets it to 0.
SLOW_ENV = "CONTROL_SLOW_SECONDS"
#: The rate limit of ``rate_limited`` (read when a server registers the tasks).
RATE_ENV = "CONTROL_RATE_LIMIT"
#: Longer than any test waits: a task that "hangs" never ends by itself within a test.
HANG_SECONDS = 90.0
_ballast: list[bytes] = []  # what ``grow`` keeps alive in its process


@dataclass(frozen=True)
class Event:
    event: str
    tag: str
    pid: int
    time: float


def record(event: str, tag: str) -> None:
    """Append one event of this process to ``$CONTROL_EVENTS``."""
    line = f"{event} {tag} {os.getpid()} {time.time():.6f}\n"
    with open(os.environ[EVENTS_ENV], "a", encoding="utf-8") as out:
        out.write(line)


def events(path: Path | str, tag: str | None = None, event: str | None = None) -> list[Event]:
    """The events recorded so far (of ``tag`` and kind ``event`` when given), oldest first."""
    path = Path(path)
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, label, pid, at = line.split()
        if (tag is None or label == tag) and (event is None or name == event):
            found.append(Event(name, label, int(pid), float(at)))
    return found


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)  # short steps: a signal (the soft limit) is handled at once


# --------------------------------------------------------------------------- the tasks


def hang(tag: str) -> str:
    """A ``def`` task that does not end by itself within a test."""
    record("start", tag)
    _sleep(HANG_SECONDS)
    record("end", tag)
    return tag


def hang_once(tag: str) -> str:
    """Hangs on its first run (of this tag), returns at once on the next ones."""
    first = not events(os.environ[EVENTS_ENV], tag, "start")
    record("start", tag)
    if first:
        _sleep(HANG_SECONDS)
    record("end", tag)
    return tag


async def hang_async(tag: str) -> str:
    """An ``async def`` task that does not end by itself within a test."""
    record("start", tag)
    try:
        await asyncio.sleep(HANG_SECONDS)
    except asyncio.CancelledError:
        record("cancelled", tag)
        raise
    record("end", tag)
    return tag


def soft(tag: str) -> str:
    """Catches its soft time limit to clean up (a ``def`` task: in a pool process)."""
    record("start", tag)
    try:
        _sleep(HANG_SECONDS)
    except SoftTimeLimitExceeded:
        record("cleanup", tag)
        return "cleaned up"
    record("end", tag)
    return tag


async def soft_async(tag: str) -> str:
    """Catches its soft time limit to clean up (an ``async def`` task)."""
    record("start", tag)
    try:
        await asyncio.sleep(HANG_SECONDS)
    except SoftTimeLimitExceeded:
        record("cleanup", tag)
        return "cleaned up"
    record("end", tag)
    return tag


def sleepy(tag: str, seconds: float) -> str:
    record("start", tag)
    _sleep(seconds)
    record("end", tag)
    return tag


async def sleepy_async(tag: str, seconds: float) -> str:
    record("start", tag)
    await asyncio.sleep(seconds)
    record("end", tag)
    return tag


def slow(tag: str) -> str:
    """Takes ``$CONTROL_SLOW_SECONDS`` (20 by default)."""
    return sleepy(tag, float(os.environ.get(SLOW_ENV, "20")))


def quick(tag: str) -> str:
    record("run", tag)
    return tag


def pid_of(tag: str) -> int:
    """The process id it ran in."""
    record("run", tag)
    return os.getpid()


def grow(tag: str, megabytes: int) -> int:
    """Keeps ``megabytes`` of touched memory alive in its process; returns the process id."""
    record("run", tag)
    _ballast.append(b"x" * (megabytes * 1024 * 1024))  # written, so resident
    return os.getpid()


def report(ctx: TaskContext, tag: str) -> str:
    """Reports progress, then waits until the file ``<events>.<tag>.release`` exists."""
    ctx.progress(0.5, "half way")
    record("reported", tag)
    release = Path(f"{os.environ[EVENTS_ENV]}.{tag}.release")
    deadline = time.monotonic() + HANG_SECONDS
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    ctx.progress(1.0, "done")
    return tag


def fail(tag: str) -> str:
    """Fails two frames down, so the stored traceback has the task's own frames to show."""
    record("start", tag)
    return _prepare(tag)


def _prepare(tag: str) -> str:
    return _deepest_step(tag)


def _deepest_step(tag: str) -> str:
    raise ValueError(f"broken {tag}")


def register(server: Server) -> None:
    """Register every task on ``server``, plus variants with controls declared at registration."""
    for fn in (hang, hang_once, hang_async, soft, soft_async, sleepy, sleepy_async, slow, quick, pid_of, grow, fail):
        server.register_task(fn.__name__, fn)
    server.register_task("report", report)
    server.register_task("hang_limited", hang, time_limit=1)
    server.register_task("hang_async_limited", hang_async, time_limit=1)
    server.register_task("sleepy_async_patient", sleepy_async, time_limit=30)
    server.register_task("soft_limited", soft, soft_time_limit=1, time_limit=60)
    server.register_task("soft_async_limited", soft_async, soft_time_limit=1, time_limit=60)
    server.register_task("rate_limited", quick, rate_limit=os.environ.get(RATE_ENV, "5/s"))
