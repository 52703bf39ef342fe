"""``machinery demo``: a worker and a client in one process, showing the main job end to end.

The demo is a list of ``DemoStep``s. Each step sends something and says what it should
return; the demo sends them all, then prints each result as it arrives with the states the
task went through and how long it took. Adding an example (a chain, a group, a chord...) is
adding a task to ``TASKS`` if it needs one and a step to ``STEPS``.

States are recorded as the backend writes them rather than by polling: a worker writes
RECEIVED and STARTED together, so a poller would never see RECEIVED.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import click

from . import log
from .config import Config
from .errors import MachineryError, TaskFailed
from .result import AsyncResult
from .retry import RetryTaskLater
from .server import Server
from .signature import Signature
from .state import COMPLETED_STATES, FAILURE, RETRY, SUCCESS, TaskState
from .worker import Worker

RESULTS_TIMEOUT = 15.0
"""Seconds the demo waits for all its results."""
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


TASKS: dict[str, Callable[..., Any]] = {"add": add, "multiply": multiply, "flaky": flaky, "retry_later": retry_later}


# --------------------------------------------------------------------------- the steps


class ResultHandle(Protocol):
    """What a step's send returns: AsyncResult, ChainAsyncResult, ChordAsyncResult..."""

    @property
    def task_uuid(self) -> str:
        """The task whose states are shown (a chain's or chord's last task)."""

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
]


# --------------------------------------------------------------------------- running


class StateLog:
    """Every state the server's backend writes, with the time it was written."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[str, float]]] = defaultdict(list)

    def attach(self, server: Server) -> None:
        """Record the writes of ``server``'s backend from now on (this process only)."""
        write = server.backend.write_states

        async def recording_write(states: Sequence[TaskState], keep_created: bool) -> None:
            await write(states, keep_created)
            now = time.perf_counter()
            for state in states:
                self.history[state.task_uuid].append((state.state, now))

        server.backend.write_states = recording_write  # type: ignore[method-assign]


@dataclass
class _Outcome:
    step: DemoStep
    task_uuid: str
    sent: float
    done: float
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.value == self.step.expected


def run_demo(broker: str | None = None, steps: Sequence[DemoStep] = STEPS, verbose: bool = False) -> bool:
    """Run a worker and the ``steps`` against ``broker`` (a temporary SQLite file by default).

    Prints as it goes; returns True when every step returned what it should. Raises
    ``DemoError`` if the worker cannot start, and the broker's errors if it cannot be reached.
    """
    _calls.clear()
    with tempfile.TemporaryDirectory(prefix="machinery-demo-") as tmp, _quiet(verbose):
        url = broker or f"sqlite:///{Path(tmp) / 'machinery.db'}"
        return asyncio.run(_demo(url, steps))


async def _demo(url: str, steps: Sequence[DemoStep]) -> bool:
    queue = f"machinery_demo_{uuid.uuid4().hex[:8]}"
    server = Server(Config(broker=url, default_queue=queue))
    try:
        server.register_tasks(TASKS)
        await server.backend.aget_state("machinery-demo-probe")  # fail now, clearly, if unreachable
        states = StateLog()
        states.attach(server)
        out = _Printer(steps)
        out.header(url, queue)
        worker = server.new_worker("machinery-demo", concurrency=4)
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
                outcomes.append(outcome)
                out.outcome(outcome, states.history.get(outcome.task_uuid, []))
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
        await server.aclose()


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
    outcome = _Outcome(step, result.task_uuid, sent, sent)
    try:
        outcome.value = await result.aget(timeout=max(0.0, deadline - time.perf_counter()))
    except TaskFailed as exc:
        outcome.error = f"FAILURE: {exc.error}"
    except TimeoutError:
        outcome.error = f"no result within {RESULTS_TIMEOUT:g} s"
    outcome.done = time.perf_counter()
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


STATE_COLOURS = {SUCCESS: "green", FAILURE: "red", RETRY: "yellow"}


class _Printer:
    """Aligned, coloured lines on a terminal; the same text without colour when piped."""

    def __init__(self, steps: Sequence[DemoStep]) -> None:
        self.steps = steps
        self.label_width = max(len(s.label) for s in steps)
        self.value_width = max(len(_show(s.expected)) for s in steps)
        self.arrow, self.dots = ("→", "⋯") if _fits_output("→⋯") else ("->", "...")

    def header(self, url: str, queue: str) -> None:
        click.echo(click.style("machinery demo", bold=True) + ": a worker and a client in this process")
        click.echo(f"  broker and backend  {url}")
        click.echo(f"  queue               {queue}")

    def sending(self) -> None:
        click.echo("\nSending:")
        for step in self.steps:
            note = click.style(step.note, dim=True) if step.note else ""
            click.echo(f"  {step.label:<{self.label_width}}  {note}".rstrip())
        click.echo("\nResults, as they arrive:")

    def outcome(self, outcome: _Outcome, history: list[tuple[str, float]]) -> None:
        finished = [t for state, t in history if state in COMPLETED_STATES]
        elapsed = (finished[-1] if finished else outcome.done) - outcome.sent
        if outcome.error:
            text = f"✗ {outcome.error}" if _fits_output("✗") else outcome.error
        elif outcome.ok:
            text = f"= {_show(outcome.value)}"
        else:
            text = f"= {_show(outcome.value)} (expected {_show(outcome.step.expected)})"
        shown = click.style(f"{text:<{self.value_width + 2}}", fg="green" if outcome.ok else "red", bold=outcome.ok)
        lines = self._chain(history) or [""]
        prefix = f"  {click.style(f'{outcome.step.label:<{self.label_width}}', bold=True)}  {shown}"
        click.echo(f"{prefix}  {_duration(elapsed):>9}  {lines[0]}".rstrip())
        indent = " " * (2 + self.label_width + 2 + 2 + self.value_width + 2 + 9 + 2)
        for line in lines[1:]:
            click.echo(indent + line)

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
                click.style(f"All {good} tasks returned what they should", fg="green") + f", in {_duration(elapsed)}."
            )
        else:
            click.echo(click.style(f"{len(outcomes) - good} of {len(outcomes)} tasks went wrong.", fg="red"))
            for exc in errors:
                click.echo(f"  the worker reported: {type(exc).__name__}: {exc}")
        click.echo("Worker stopped.")
