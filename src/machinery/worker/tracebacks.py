"""The tracebacks stored beside a failed task's state: the task's own frames, not the worker's.

A failure's traceback starts in the worker (the handler, the executor, a pool child's loop);
those leading frames say nothing about the task and are dropped. A task stopped at its time
limit or by a revocation raised nothing itself, so its traceback is where it was waiting when
it was stopped, taken from its coroutine or thread before the stop.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ..errors import ArgumentError, TaskRevoked, TimeLimitExceeded, WorkerProcessDied

#: A failure's log line carries this many of the task's last frames.
LOGGED_FRAMES = 3

#: Where the worker's own frames come from: this package and the standard library (threads,
#: executors, asyncio) that runs the task; installed packages, which may be the task's, are not.
_PACKAGE = str(Path(__file__).resolve().parent.parent) + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_INSTALLED = tuple({sysconfig.get_paths()[name] + os.sep for name in ("purelib", "platlib")})
_CARRIED = "__machinery_traceback__"


def _ours(filename: str) -> bool:
    if filename.startswith(_PACKAGE) or filename.startswith("<frozen "):
        return True
    return filename.startswith(_STDLIB) and not filename.startswith(_INSTALLED)


def format_failure(exc: BaseException) -> str:
    """``exc`` as a traceback whose leading frames in the worker are left out."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def carry(exc: BaseException, text: str) -> None:
    """Make ``text`` the traceback stored for ``exc`` (from a child process, or a stop)."""
    setattr(exc, _CARRIED, text)


def where_it_waits(frames: list[FrameType], exc: BaseException) -> str | None:
    """A traceback made of the task's frames at the moment it was stopped, ending in ``exc``."""
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames if not _ours(f.f_code.co_filename))
    if not summary:
        return None
    lines = ["Traceback (most recent call last; where the task was when it was stopped):\n"]
    lines += summary.format()
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def coroutine_frames(coro: Any) -> list[FrameType]:
    """The frames of a suspended coroutine and of what it awaits, outermost first."""
    return list(_awaited_frames(coro))


def _awaited_frames(awaitable: Any) -> Iterator[FrameType]:
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is not None:
            yield frame
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)


def thread_frames(thread_id: int) -> list[FrameType]:
    """The frames a thread is in now, outermost first."""
    frame: FrameType | None = sys._current_frames().get(thread_id)
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames[::-1]


def traceback_of(exc: BaseException | None) -> str | None:
    """The traceback to store for a failure, or None for one the task did not raise and that
    has no frames of the task to show (a bad argument, a stop with the task out of reach)."""
    if exc is None:
        return None
    carried = getattr(exc, _CARRIED, None)
    if isinstance(carried, str):
        return carried
    if isinstance(exc, (ArgumentError, TaskRevoked, TimeLimitExceeded, WorkerProcessDied)):
        return None
    return format_failure(exc)


def last_frames(trace: str) -> str:
    """The last ``LOGGED_FRAMES`` frames of a traceback's text, for a one-entry log line."""
    lines = trace.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if not frames:
        return ""
    start = frames[-LOGGED_FRAMES] if len(frames) >= LOGGED_FRAMES else frames[0]
    end = len(lines) - 1  # the last line repeats the error itself
    return "\n" + "\n".join(lines[start:end])
