"""An app whose ``slow`` task records when it starts and ends, for tests that stop workers mid-task.

Configured from the environment as any app would be (``BROKER``, ``DEFAULT_QUEUE``...), plus
``MARKER_FILE`` (where the records go) and ``SLOW_SECONDS`` (how long the task takes).
"""

from __future__ import annotations

import os
import time

from machinery import Config, Server

server = Server(Config.from_env())


def _record(event: str, task: str) -> None:
    with open(os.environ["MARKER_FILE"], "a", encoding="utf-8") as marker:
        marker.write(f"{event} {task} {os.getpid()}\n")


@server.task
def slow(label: str) -> str:
    """A ``def`` task (it runs on a thread) that takes ``SLOW_SECONDS`` in small steps."""
    _record("start", label)
    deadline = time.monotonic() + float(os.environ.get("SLOW_SECONDS", "20"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _record("end", label)
    return label
