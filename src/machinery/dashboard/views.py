"""What the dashboard shows, read through the broker and backend seams (no driver named).

Every read that a broker or backend cannot answer becomes "not available on this broker"
(``UnsupportedOperation``), never an error page.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from ..errors import MachineryError, UnsupportedOperation
from ..server import Server
from ..signature import Signature
from ..state import FAILURE, PROGRESS, TRACEBACK, GroupMeta, TaskState, WorkerInfo, parse_progress

T = TypeVar("T")

NOT_AVAILABLE = "not available on this broker"
#: Throughput samples kept per queue (one per refresh of the overview).
SAMPLES = 120
#: Seconds over which each throughput point is measured.
RATE_WINDOW = 60.0
#: A queue is read (to remember its tasks) only while at most this many wait in it.
PEEK_AT_MOST = 200
#: Task UUIDs the dashboard remembers having seen (waiting or running), for recent failures.
REMEMBERED = 2000


@dataclass
class Answer:
    """A value, or why there is none (``missing``: the seam's reason)."""

    value: Any = None
    missing: str = ""


async def answer(call: Awaitable[T]) -> Answer:
    try:
        return Answer(await call)
    except UnsupportedOperation:
        return Answer(missing=NOT_AVAILABLE)


@dataclass
class QueueView:
    name: str
    depth: Answer
    delayed: Answer
    dead: Answer
    throughput: list[float]  # tasks per minute, oldest first
    chart: str  # SVG polyline points


@dataclass
class Failure:
    uuid: str
    name: str
    error: str


@dataclass
class Watch:
    """What the dashboard has seen of the system between refreshes: throughput samples and
    the UUIDs of tasks seen waiting or running (backends cannot list states)."""

    samples: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    seen: OrderedDict[str, Signature | None] = field(default_factory=OrderedDict)
    history: dict[str, list[tuple[datetime, str]]] = field(default_factory=dict)

    def remember(self, uuid: str, signature: Signature | None = None) -> None:
        known = self.seen.pop(uuid, None)
        self.seen[uuid] = signature or known
        while len(self.seen) > REMEMBERED:
            gone, _ = self.seen.popitem(last=False)
            self.history.pop(gone, None)

    def observe(self, state: TaskState) -> None:
        steps = self.history.setdefault(state.task_uuid, [])
        if not steps or steps[-1][1] != state.state:
            steps.append((datetime.now(timezone.utc), state.state))

    def throughput(self, queue: str, processed: int) -> list[float]:
        """Tasks per minute at each sample, each over the ``RATE_WINDOW`` seconds before it
        (workers report their counts every heartbeat, a few seconds apart: a window smooths
        the steps). A drop in the count (a worker stopped) counts as no tasks."""
        samples = self.samples.setdefault(queue, deque(maxlen=SAMPLES))
        samples.append((time.monotonic(), processed))
        points = list(samples)
        rates = []
        start = 0
        for t1, n1 in points[1:]:
            while points[start][0] < t1 - RATE_WINDOW:
                start += 1
            t0, n0 = points[start] if points[start][0] < t1 else points[max(0, start - 1)]
            rates.append(max(0, n1 - n0) * 60 / max(t1 - t0, 1e-3))
        return rates


def chart_points(rates: list[float], width: int = 160, height: int = 30) -> str:
    if not rates:
        return ""
    top = max(max(rates), 1.0)
    step = width / max(len(rates) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - r / top * height:.1f}" for i, r in enumerate(rates))


class Dashboard:
    """Reads for the pages; one per app."""

    def __init__(self, server: Server, queues: Iterable[str] = ()) -> None:
        self.server = server
        self.queues = list(dict.fromkeys([server.config.default_queue, *queues]))
        self.watch = Watch()

    async def workers(self) -> Answer:
        found = await answer(self.server.backend.get_workers())
        for worker in found.value or []:
            for running in worker.running:
                self.watch.remember(running.task_uuid)
        return found

    async def overview(self) -> dict[str, Any]:
        workers = await self.workers()
        live: list[WorkerInfo] = workers.value or []
        names = list(dict.fromkeys([*self.queues, *(w.queue for w in live)]))
        broker = self.server.broker
        queues = []
        for name in names:
            depth = await answer(broker.queue_depth(name))
            if depth.value is not None and depth.value <= PEEK_AT_MOST:
                # Remembered for the recent failures; a deep queue is not read every refresh.
                for signature in (await answer(broker.get_pending_tasks(name))).value or []:
                    self.watch.remember(signature.uuid, signature)
            rates = self.watch.throughput(name, sum(w.processed for w in live if w.queue == name))
            queues.append(
                QueueView(
                    name,
                    depth,
                    await answer(broker.delayed_count(name)),
                    await answer(broker.dead_count(name)),
                    rates,
                    chart_points(rates),
                )
            )
        return {
            "queues": queues,
            "workers": workers,
            "now": datetime.now(timezone.utc),
            "periodic": self._periodic(),
            "failures": await self.failures(),
        }

    def _periodic(self) -> list[tuple[str, str, str, datetime | None]]:
        now = datetime.now(timezone.utc)
        entries = []
        for entry in self.server.periodic.entries():
            upcoming = entry.next_run or entry.schedule.next(now)
            entries.append((entry.name, entry.spec, entry.kind, upcoming))
        return entries

    async def failures(self) -> list[Failure]:
        uuids = list(self.watch.seen)[-500:]
        if not uuids:
            return []
        states = await self.server.backend.get_states(uuids)
        failed = []
        for state in states:
            if state is None:
                continue
            self.watch.observe(state)
            if state.state == FAILURE:
                failed.append(Failure(state.task_uuid, state.task_name, state.error))
        return failed[-20:][::-1]

    async def task(self, uuid: str) -> dict[str, Any]:
        backend = self.server.backend
        if uuid.startswith("group_"):
            meta: GroupMeta | None = await backend.get_group_meta(uuid)
            members = list(zip(meta.task_uuids, await backend.get_states(meta.task_uuids), strict=True)) if meta else []
            unfinished = [m for m, st in members if st is None or not st.is_completed()]
            return {"uuid": uuid, "group": meta, "members": members, "unfinished": unfinished}
        state = await backend.get_state(uuid)
        if state is not None:
            self.watch.remember(uuid)
            self.watch.observe(state)
        traceback = await _annotation(backend.get_annotation(uuid, TRACEBACK))
        progress = parse_progress(await _annotation(backend.get_annotation(uuid, PROGRESS)))
        signature = self.watch.seen.get(uuid)
        return {
            "uuid": uuid,
            "state": state,
            "traceback": traceback,
            "progress": progress,
            "signature": signature,
            "history": self.watch.history.get(uuid, []),
        }

    async def dead(self) -> list[tuple[str, Answer]]:
        return [(name, await answer(self.server.broker.dead_letters(name))) for name in await self._all_queues()]

    async def _all_queues(self) -> list[str]:
        workers = await self.workers()
        return list(dict.fromkeys([*self.queues, *(w.queue for w in workers.value or [])]))


async def _annotation(call: Awaitable[str | None]) -> str | None:
    try:
        return await call
    except UnsupportedOperation:
        return None


def describe(body: bytes) -> str:
    """A dead letter's body as a person reads it: the task and its arguments, or the bytes."""
    try:
        signature = Signature.decode(body)
    except MachineryError:
        return body.decode("utf-8", "backslashreplace")[:200]
    args = ", ".join(repr(a.value) for a in signature.args or ())
    return f"{signature.name}({args}) {signature.uuid}"
