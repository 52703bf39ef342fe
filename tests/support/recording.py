"""Records of what happened: in this process (``Recorder``, ``Events``) and across processes
(``FileRecord``), and the seed's tasks that write into them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from machinery import Middleware, Outcome, Server, Signature

from .waiting import WAIT


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


class Events(Middleware):
    """Middleware recording every event of the servers it is given to, in order.

    Each entry is ``(hook, task UUID or "", detail)``: the outcome's state for
    ``after_process``, the reason for ``after_dead_letter``, else "".
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[str, str, str]] = []
        self.published: list[Signature] = []

    def _add(self, hook: str, uuid: str, detail: str = "") -> None:
        with self.lock:
            self.entries.append((hook, uuid, detail))

    def before_publish(self, signature: Signature) -> None:
        with self.lock:
            self.published.append(signature)
        self._add("before_publish", signature.uuid)

    def before_process(self, signature: Signature) -> None:
        self._add("before_process", signature.uuid)

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        self._add("after_process", signature.uuid, outcome.state)

    def after_ack(self, signature: Signature) -> None:
        self._add("after_ack", signature.uuid)

    def after_requeue(self, signature: Signature) -> None:
        self._add("after_requeue", signature.uuid)

    def after_dead_letter(self, body: bytes, reason: str) -> None:
        self._add("after_dead_letter", "", reason)

    def of(self, hook: str) -> list[tuple[str, str]]:
        """(task UUID, detail) of every ``hook`` event so far."""
        with self.lock:
            return [(uuid, detail) for h, uuid, detail in self.entries if h == hook]

    def count(self, hook: str) -> int:
        return len(self.of(hook))

    def uuids(self) -> set[str]:
        """Every task, callback and group UUID published so far."""
        with self.lock:
            found = {s.uuid for s in self.published}
            found |= {s.group_uuid for s in self.published if s.group_uuid}
        return found - {""}


class FileRecord:
    """An append-only JSON-lines file that several processes write to and a test reads.

    Each record is one short ``O_APPEND`` write, so lines of different processes never
    interleave; this works the same whichever broker and backend the processes use.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def add(self, record: Any) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def read(self) -> list[Any]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.read())


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


def register_workflow_tasks(server: Server) -> Recorder:
    """The seed's tasks and those of the workflow tests (failing, gated on ``rec.gate``); returns
    the Recorder they all write to."""
    rec = Recorder()

    register_seed_tasks(server, rec)

    @server.task
    def fail(message: str, *previous: int) -> int:
        rec.add("fail", message, *previous)
        raise ValueError(message)

    @server.task
    def gated(value: int) -> int:
        # Blocks until the test opens the gate: a member that is provably still running.
        assert rec.gate.wait(WAIT), "gate never opened"
        rec.add("gated", value)
        return value

    @server.task
    def gated_fail(message: str) -> int:
        assert rec.gate.wait(WAIT), "gate never opened"
        rec.add("gated_fail", message)
        raise ValueError(message)

    @server.task
    def on_error(error: str, *extra: int) -> None:
        rec.add("on_error", error, *extra)

    return rec
