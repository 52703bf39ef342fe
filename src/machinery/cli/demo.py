"""``machinery demo``: a worker and a client in one process, showing the main job end to end.

The demo is a list of ``DemoStep``s. Each step sends something and says what it should
return; the demo sends them all, then prints each result as it arrives with the states the
task went through and how long it took. The steps are single tasks (with an ETA, retries,
``RetryTaskLater``), the seed's chain, group and chord, and a periodic task that a
scheduler fires on ``@every 1s`` until it has ticked three times. A step of several tasks
prints one line per task: its name, when its first state was written (counted from the
step's send), and its states. Adding an example is adding a task to ``TASKS`` if it needs
one and a step to ``STEPS``.

States are recorded by a middleware (``StateLog``) rather than by polling: a worker writes
RECEIVED and STARTED together, so a poller would never see RECEIVED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import click

from .. import log
from ..config import AMQPConfig, Config
from ..errors import MachineryError, TaskFailed
from ..middleware import Middleware, Outcome
from ..result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from ..retry import RetryTaskLater
from ..server import Server
from ..signature import Chain, Chord, Group, Signature
from ..state import COMPLETED_STATES, PENDING, RECEIVED, RETRY, STARTED
from ..worker import Worker
from .formatting import STATE_COLOURS

RESULTS_TIMEOUT = 60.0
"""Seconds the demo waits for all its results (a cloud broker's round trips, or a busy local
stand-in, take far longer than Redis's; a working run ends as soon as its results are in)."""
WORKER_START_TIMEOUT = 10.0
GAP_SHOWN = 0.1
"""Waits between two states at least this long (seconds) are shown in the state chain."""


class DemoError(MachineryError):
    """The demo could not run (its worker did not start)."""


# --------------------------------------------------------------------------- the example tasks

_calls: Counter[str] = Counter()
"""How many times each demo task has run in this process; reset when a demo starts."""


def add(*args: int) -> int:
    """Return the sum of the arguments."""
    return sum(args)


def multiply(*args: int) -> int:
    """Return the product of the arguments."""
    product = 1
    for arg in args:
        product *= arg
    return product


def flaky() -> str:
    """Fail the first two times it runs, then succeed."""
    _calls["flaky"] += 1
    attempt = _calls["flaky"]
    if attempt <= 2:
        raise RuntimeError(f"flaky failure {attempt}")
    return f"ok on attempt {attempt}"


def retry_later() -> str:
    """Ask to be run again in a second the first time, then succeed."""
    _calls["retry_later"] += 1
    if _calls["retry_later"] == 1:
        raise RetryTaskLater("not yet", delay=1)
    return "ok"


def tick() -> int:
    """Count the ticks: return how many times it has run in this process."""
    _calls["tick"] += 1
    return _calls["tick"]


TASKS: dict[str, Callable[..., Any]] = {
    "add": add,
    "multiply": multiply,
    "flaky": flaky,
    "retry_later": retry_later,
    "tick": tick,
}


# --------------------------------------------------------------------------- the steps


class ResultHandle(Protocol):
    """What a step's send returns: AsyncResult, ChainAsyncResult, ChordAsyncResult, GroupResult..."""

    async def aget(self, timeout: float | None = None) -> Any:
        """Wait for the result."""


Sender = Callable[[Server], Awaitable[ResultHandle]]


@dataclass(frozen=True)
class DemoStep:
    """One thing the demo sends: how it is shown, how it is sent, and what it must return."""

    label: str
    send: Sender
    expected: Any
    note: str = ""


def send_task(name: str, *args: Any, eta_in: float | None = None, **options: Any) -> Sender:
    """A Sender of one task; ``eta_in`` seconds count from the moment it is sent."""

    async def send(server: Server) -> AsyncResult:
        eta = datetime.now(timezone.utc) + timedelta(seconds=eta_in) if eta_in is not None else None
        return await server.asend_task(Signature(name, list(args), eta=eta, **options))

    return send


def call(name: str, *args: Any) -> Signature:
    """A signature of ``name`` with ``args`` (Go's default types)."""
    return Signature(name, list(args))


def send_chain(*steps: Signature) -> Sender:
    """A Sender of a fresh chain of copies of ``steps``."""

    async def send(server: Server) -> ChainAsyncResult:
        return await server.asend_chain(Chain(*(s.copy() for s in steps)))

    return send


class GroupResult:
    """A sent group as one handle: ``aget`` returns the members' values in group order."""

    def __init__(self, results: Sequence[AsyncResult]) -> None:
        self.results = list(results)

    @property
    def task_uuids(self) -> list[str]:
        return [r.task_uuid for r in self.results]

    async def aget(self, timeout: float | None = None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        return [await r.aget(None if deadline is None else max(0.0, deadline - time.monotonic())) for r in self.results]


def send_group(*members: Signature) -> Sender:
    """A Sender of a fresh group of copies of ``members``."""

    async def send(server: Server) -> GroupResult:
        return GroupResult(await server.asend_group(Group(*(m.copy() for m in members))))

    return send


def send_chord(members: Sequence[Signature], callback: Signature) -> Sender:
    """A Sender of a fresh chord: copies of ``members``, then ``callback`` with their results."""

    async def send(server: Server) -> ChordAsyncResult:
        return await server.asend_chord(Chord(Group(*(m.copy() for m in members)), callback.copy()))

    return send


class PeriodicTicks(Middleware):
    """A periodic task registered for the demo, until its first ``ticks`` sends.

    ``start`` registers the entry under a unique name (so that demos sharing a broker do not
    take each other's ticks) and runs a scheduler for it, as ``machinery periodic`` does;
    ``aget`` waits for the ticks' results, then removes the entry and stops the scheduler.
    """

    def __init__(self, server: Server, spec: str, task: str, ticks: int) -> None:
        self.server = server
        self.spec = spec
        self.task = task
        self.ticks = ticks
        self.name = f"machinery-demo-{task}-{uuid.uuid4().hex[:8]}"
        self.results: list[AsyncResult] = []
        self._enough = asyncio.Event()
        self._stop = asyncio.Event()
        self._scheduler: asyncio.Future[None] | None = None

    @property
    def task_uuids(self) -> list[str]:
        return [r.task_uuid for r in self.results]

    async def start(self) -> PeriodicTicks:
        self.server.add_middleware(self)  # to see the ticks' tasks as they are published
        self.server.register_periodic_task(self.spec, self.name, Signature(self.task, []))
        self._scheduler = asyncio.ensure_future(self.server.periodic.run(self._stop))
        return self

    def after_publish(self, signature: Signature) -> None:
        if signature.name != self.task or len(self.results) >= self.ticks:
            return
        self.results.append(AsyncResult(signature.uuid, self.server.backend))
        if len(self.results) == self.ticks:
            self.server.remove_periodic(self.name)  # no more ticks, even before the scheduler stops
            self._enough.set()

    async def aget(self, timeout: float | None = None) -> list[Any]:
        """Wait for ``ticks`` sends and their results; stops the scheduler either way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                await asyncio.wait_for(self._enough.wait(), timeout)
            except asyncio.TimeoutError:  # not yet TimeoutError itself on Python 3.10
                raise TimeoutError(f"{len(self.results)} of {self.ticks} ticks within {timeout} s") from None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await GroupResult(self.results).aget(left)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Remove the entry and stop the scheduler (at once: it has nothing else to send)."""
        self.server.remove_periodic(self.name)
        self.server.middleware.remove(self)
        self._stop.set()
        if self._scheduler is not None:
            with suppress(asyncio.TimeoutError):  # wait_for cancels it then
                await asyncio.wait_for(self._scheduler, WORKER_START_TIMEOUT)


def every(spec: str, task: str, ticks: int) -> Sender:
    """A Sender registering ``task`` as a periodic task on ``spec``, waited on for ``ticks`` sends."""

    async def send(server: Server) -> PeriodicTicks:
        return await PeriodicTicks(server, spec, task, ticks).start()

    return send


def tracked(handle: ResultHandle) -> list[str]:
    """The tasks whose states a step's result shows, in order (a chord's callback last)."""
    if isinstance(handle, ChainAsyncResult):
        return [r.task_uuid for r in handle.results]
    if isinstance(handle, ChordAsyncResult):
        return [*(r.task_uuid for r in handle.results), handle.task_uuid]
    if isinstance(handle, AsyncResult):
        return [handle.task_uuid]
    return list(getattr(handle, "task_uuids", []))


STEPS: list[DemoStep] = [
    DemoStep("add(1, 1)", send_task("add", 1, 1), 2),
    DemoStep("multiply(2, 3)", send_task("multiply", 2, 3), 6),
    DemoStep("add(2, 3)", send_task("add", 2, 3, eta_in=2), 5, "with an ETA 2 s ahead"),
    DemoStep(
        "flaky()",
        send_task("flaky", retry_count=3),
        "ok on attempt 3",
        "fails twice, then succeeds; sent with retry_count=3",
    ),
    DemoStep(
        "retry_later()",
        send_task("retry_later"),
        "ok",
        'raises RetryTaskLater("not yet", delay=1) once, then succeeds',
    ),
    DemoStep(
        "chain",
        send_chain(call("add", 1, 1), call("add", 5, 5), call("multiply", 4)),
        48,
        "add(1, 1) → add(5, 5) → multiply(4), each given the previous result",
    ),
    DemoStep(
        "group",
        send_group(call("add", 1, 1), call("add", 5, 5)),
        [2, 10],
        "add(1, 1) and add(5, 5) in parallel, results in group order",
    ),
    DemoStep(
        "chord",
        send_chord([call("add", 1, 1), call("add", 5, 5)], call("multiply")),
        20,
        "[add(1, 1), add(5, 5)] → multiply() of their results",
    ),
    DemoStep(
        "periodic",
        every("@every 1s", "tick", 3),
        [1, 2, 3],
        "tick() on @every 1s by a periodic scheduler, until 3 ticks",
    ),
]


# --------------------------------------------------------------------------- running


class StateLog(Middleware):
    """Every state the demo's tasks go through, with the time each was reached, and task names.

    A middleware: PENDING when a task is published, RECEIVED and STARTED when the worker
    takes it (it writes both at once, so a poller would never see RECEIVED), and the
    outcome when it is about to be stored (``before_store``). The outcome is named only in
    ``after_process``, which runs once a retry has been published again, so it is filed at
    the moment ``before_store`` saw.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self.names: dict[str, str] = {}
        self.groups: set[str] = set()
        self._storing: dict[str, float] = {}

    def _record(self, signature: Signature, states: Sequence[str], at: float) -> None:
        self.names[signature.uuid] = signature.name
        if signature.group_uuid:
            self.groups.add(signature.group_uuid)
        history = self.history[signature.uuid]
        history.extend((state, at) for state in states)
        history.sort(key=lambda entry: entry[1])

    def after_publish(self, signature: Signature) -> None:
        self._record(signature, [PENDING], time.perf_counter())

    def before_process(self, signature: Signature) -> None:
        self._record(signature, [RECEIVED, STARTED], time.perf_counter())

    def before_store(self, signature: Signature, outcome: Outcome) -> None:
        self._storing[signature.uuid] = time.perf_counter()

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        self._record(signature, [outcome.state], self._storing.pop(signature.uuid, time.perf_counter()))

    async def settled(self, task_uuids: Sequence[str], timeout: float = 1.0) -> None:
        """Wait (briefly) until each task's final state is recorded: a result wakes its
        waiter when it is stored, a moment before ``after_process`` runs."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(self.history.get(u) and self.history[u][-1][0] in COMPLETED_STATES for u in task_uuids):
                return
            await asyncio.sleep(0.001)


@dataclass
class _Outcome:
    step: DemoStep
    task_uuids: list[str]
    sent: float
    done: float
    value: Any = None
    error: str = ""
    several: bool = False
    """A workflow or periodic step: one line per task."""

    @property
    def ok(self) -> bool:
        return not self.error and self.value == self.step.expected


def run_demo(
    broker: str | None = None, steps: Sequence[DemoStep] = STEPS, verbose: bool = False, backend: str | None = None
) -> bool:
    """Run a worker and the ``steps`` against ``broker`` (a temporary SQLite file by default).

    Prints as it goes; returns True when every step returned what it should. Raises
    ``DemoError`` if the worker cannot start, and the broker's errors if it cannot be reached.
    """
    _calls.clear()
    with tempfile.TemporaryDirectory(prefix="machinery-demo-") as tmp, _quiet(verbose):
        url = broker or f"sqlite:///{Path(tmp) / 'machinery.db'}"
        return asyncio.run(_demo(url, steps, backend or ""))


async def _demo(url: str, steps: Sequence[DemoStep], backend: str = "") -> bool:
    queue = f"machinery_demo_{uuid.uuid4().hex[:8]}"
    states = StateLog()
    # Its own queue and, on RabbitMQ, its own binding key: with a direct exchange the binding
    # key decides which queues get a task, and the default one is every app's. Results expire
    # soon, and what they cannot take away is deleted at the end.
    # The cloud sections come from the environment (endpoints, regions, table names); the demo
    # may create its own SQS queue and Pub/Sub topic, as it deletes them at the end.
    env = Config.from_env({k: v for k, v in os.environ.items() if k not in _DEMO_FIELDS_ENV})
    config = Config(
        broker=url,
        result_backend=backend,
        default_queue=queue,
        results_expire_in=120,
        amqp=AMQPConfig(binding_key=queue),
        sqs=dataclasses.replace(env.sqs, create_missing=True),
        dynamodb=env.dynamodb,
        gcppubsub=dataclasses.replace(env.gcppubsub, create_missing=True),
    )
    server = Server(config, middleware=[states])
    try:
        server.register_tasks(TASKS)
        await server.backend.get_state("machinery-demo-probe")  # fail now, clearly, if unreachable
        out = _Printer(steps, list(server.tasks))
        out.header(url, queue, backend)
        # The periodic step runs a scheduler of its own, only as long as it needs one.
        worker = server.new_worker("machinery-demo", concurrency=4, periodic=False)
        errors: list[BaseException] = []
        worker.set_error_handler(errors.append)
        running = asyncio.ensure_future(worker.arun())
        try:
            await _started(worker, running, url, errors)
            out.sending()
            started = time.perf_counter()
            deadline = started + RESULTS_TIMEOUT
            outcomes = []
            for next_done in asyncio.as_completed([_run_step(step, server, deadline) for step in steps]):
                outcome = await next_done
                await states.settled(outcome.task_uuids)
                outcomes.append(outcome)
                out.outcome(outcome, states)
        finally:
            worker.quit()
            try:
                await asyncio.wait_for(asyncio.shield(running), 10)
            except asyncio.TimeoutError:
                worker.quit(abort=True)
                await running
        out.summary(outcomes, time.perf_counter() - started, errors)
        return all(o.ok for o in outcomes)
    finally:
        await _clean_up(server, queue, states)
        await server.aclose()


#: Settings the demo chooses itself, whatever the environment says.
_DEMO_FIELDS_ENV = frozenset({"BROKER", "RESULT_BACKEND", "LOCK", "DEFAULT_QUEUE", "RESULTS_EXPIRE_IN"})


async def _clean_up(server: Server, queue: str, states: StateLog) -> None:
    """Delete what the demo put in the broker and backend (on a shared server, nothing stays)."""
    try:
        await server.broker.delete_queue(queue)
        for task_uuid in states.history:
            await server.backend.purge_state(task_uuid)
        for group_uuid in states.groups:
            await server.backend.purge_group_meta(group_uuid)
    except Exception as exc:  # what is left expires with the results
        log.logger.warning("The demo could not delete everything it made: %s", exc)


async def _started(worker: Worker, running: asyncio.Future[None], url: str, errors: list[BaseException]) -> None:
    deadline = time.perf_counter() + WORKER_START_TIMEOUT
    while not worker.started.is_set():
        if running.done():
            running.result()  # raises what stopped it
            raise DemoError("the demo's worker stopped before it started")
        if time.perf_counter() > deadline:
            worker.quit(abort=True)
            await asyncio.gather(running, return_exceptions=True)
            reason = f": {errors[-1]}" if errors else ""
            raise DemoError(f"the demo's worker could not start consuming from {url}{reason}")
        await asyncio.sleep(0.005)


async def _run_step(step: DemoStep, server: Server, deadline: float) -> _Outcome:
    sent = time.perf_counter()
    result = await step.send(server)
    outcome = _Outcome(step, [], sent, sent)
    try:
        outcome.value = await result.aget(timeout=max(0.0, deadline - time.perf_counter()))
    except TaskFailed as exc:
        outcome.error = f"FAILURE: {exc.error}"
    except TimeoutError:
        outcome.error = f"no result within {RESULTS_TIMEOUT:g} s"
    outcome.done = time.perf_counter()
    outcome.task_uuids = tracked(result)
    outcome.several = not isinstance(result, AsyncResult)
    return outcome


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Keep the worker's log out of the demo's output unless ``verbose``."""
    logger = log.get_logger()
    if verbose:
        yield
        return
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [logging.NullHandler()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved


# --------------------------------------------------------------------------- printing


def _fits_output(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.9995 else f"{seconds:.2f} s"


class _Printer:
    """Aligned, coloured lines on a terminal; the same text without colour when piped."""

    def __init__(self, steps: Sequence[DemoStep], task_names: Sequence[str] = ()) -> None:
        self.steps = steps
        self.label_width = max(len(s.label) for s in steps)
        self.value_width = max(len(_show(s.expected)) for s in steps)
        self.name_width = max((len(n) for n in task_names), default=0)
        self.arrow, self.dots = ("→", "⋯") if _fits_output("→⋯") else ("->", "...")

    def header(self, url: str, queue: str, backend: str = "") -> None:
        click.echo(click.style("machinery demo", bold=True) + ": a worker, a scheduler and a client in this process")
        if backend:
            click.echo(f"  broker              {url}")
            click.echo(f"  backend             {backend}")
        else:
            click.echo(f"  broker and backend  {url}")
        click.echo(f"  queue               {queue}")

    def sending(self) -> None:
        click.echo("\nSending:")
        for step in self.steps:
            note = click.style(step.note.replace("→", self.arrow), dim=True) if step.note else ""
            click.echo(f"  {step.label:<{self.label_width}}  {note}".rstrip())
        click.echo("\nResults, as they arrive:")

    def outcome(self, outcome: _Outcome, states: StateLog) -> None:
        histories = [(u, states.history.get(u, [])) for u in outcome.task_uuids]
        finished = [t for _, history in histories for state, t in history if state in COMPLETED_STATES]
        elapsed = (max(finished) if finished else outcome.done) - outcome.sent
        if outcome.error:
            text = f"✗ {outcome.error}" if _fits_output("✗") else outcome.error
        elif outcome.ok:
            text = f"= {_show(outcome.value)}"
        else:
            text = f"= {_show(outcome.value)} (expected {_show(outcome.step.expected)})"
        shown = click.style(f"{text:<{self.value_width + 2}}", fg="green" if outcome.ok else "red", bold=outcome.ok)
        if outcome.several:
            lines = self._tasks(histories, states.names, outcome.sent) or ["(no task sent)"]
        else:
            lines = self._chain(histories[0][1] if histories else []) or [""]
        prefix = f"  {click.style(f'{outcome.step.label:<{self.label_width}}', bold=True)}  {shown}"
        click.echo(f"{prefix}  {_duration(elapsed):>9}  {lines[0]}".rstrip())
        indent = " " * (2 + self.label_width + 2 + 2 + self.value_width + 2 + 9 + 2)
        for line in lines[1:]:
            click.echo(indent + line)

    def _tasks(
        self, histories: Sequence[tuple[str, list[tuple[str, float]]]], names: dict[str, str], sent: float
    ) -> list[str]:
        """One line per task: its name, when its first state was written after ``sent``, its states."""
        width = max([self.name_width, *(len(names.get(u, "?")) for u, _ in histories)])
        lines: list[str] = []
        for task_uuid, history in histories:
            at = f"+{_duration(history[0][1] - sent)}" if history else ""
            chain = self._chain(history) or ["(no state recorded)"]
            lines.append(f"{names.get(task_uuid, '?'):<{width}}  {at:>9}  {chain[0]}")
            lines.extend(" " * (width + 13) + line for line in chain[1:])
        return lines

    def _chain(self, history: list[tuple[str, float]]) -> list[str]:
        """The states in order, a new line after each RETRY, with the longer waits between them."""
        lines: list[str] = []
        current = ""
        previous: tuple[str, float] | None = None
        for state, at in history:
            colour = STATE_COLOURS.get(state)
            name = click.style(state, fg=colour) if colour else state
            if previous is None:
                current = name
            else:
                wait = at - previous[1]
                joint = f" {self.dots} {_duration(wait)} {self.dots} " if wait >= GAP_SHOWN else f" {self.arrow} "
                if previous[0] == RETRY:
                    lines.append(current)
                    current = joint.lstrip() + name
                else:
                    current += joint + name
            previous = (state, at)
        if current:
            lines.append(current)
        return lines

    def summary(self, outcomes: Sequence[_Outcome], elapsed: float, errors: Sequence[BaseException]) -> None:
        good = sum(o.ok for o in outcomes)
        click.echo()
        if good == len(outcomes):
            click.echo(
                click.style(f"All {good} examples returned what they should", fg="green")
                + f", in {_duration(elapsed)}."
            )
        else:
            click.echo(click.style(f"{len(outcomes) - good} of {len(outcomes)} examples went wrong.", fg="red"))
            for exc in errors:
                click.echo(f"  the worker reported: {type(exc).__name__}: {exc}")
        click.echo("Worker stopped.")
