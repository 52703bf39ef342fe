"""``machinery send``: parse task arguments as Go types, send a task or a group, wait for the outcome."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from .._sync import run_sync
from ..brokers.base import MAX_PRIORITY
from ..controls import apply_send_options
from ..dispatch import ProgressHandler
from ..errors import TaskFailed, UnsupportedOperation
from ..server import Server
from ..signature import Group, Signature
from ..state import TaskState
from ..types import BYTE_SLICE_TYPES, GO_TYPES, INT_RANGES, Arg, decode_results, infer_arg
from .app import BadArgument, CliError, WaitTimeout, app_spec, get_server, read_states, server_options
from .formatting import json_text, one_line, plural

WAIT_TIMEOUT = 60.0
"""Seconds ``send --wait`` waits by default."""
PROGRESS_MIN = 1000
"""Groups at least this big show progress bars (on a terminal)."""
WAIT_POLL_MAX = 0.5
"""Longest pause (seconds) between two looks at a group's states."""


# --------------------------------------------------------------------------- parsing send arguments


def parse_arg(text: str, position: int) -> Arg:
    """Parse one command-line task argument.

    JSON scalars and lists get Go's default types (``1`` int64, ``1.5`` float64, ``true``
    bool, ``[1,2]`` []int64, ``"x"`` string); anything else that is not JSON is a string.
    ``TYPE:VALUE`` chooses the Go type (``int32:5``, ``uint64:18446744073709551615``,
    ``string:007``, ``[]byte:hello``). Raises ``BadArgument`` naming the argument.
    """
    where = f"argument {position} ({text!r})"
    head, sep, rest = text.partition(":")
    if sep and head in GO_TYPES:
        value: Any
        if head == "string":
            value = rest
        elif head in BYTE_SLICE_TYPES:
            value = rest.encode()
        else:
            try:
                value = json.loads(rest)
            except ValueError:
                raise BadArgument(f"{where}: {rest!r} is not a JSON value for {head}") from None
        return _typed(Arg(head, value), where)
    if text.startswith("-") and not _is_number(text):
        raise BadArgument(f"no such option: {text}; to send it as a string argument, quote it as JSON: '\"{text}\"'")
    try:
        value = json.loads(text)
    except ValueError:
        if text[:1] in "[{":
            raise BadArgument(f"{where} is not valid JSON") from None
        return Arg("string", text)
    if value is None or isinstance(value, dict):
        kind = "null" if value is None else "a JSON object"
        raise BadArgument(f"{where}: {kind} has no Go type; use a number, true/false, a string or a list")
    if isinstance(value, list) and not value:
        raise BadArgument(f"{where}: an empty list has no element type; write it as []int64:[] or another []TYPE:[]")
    if isinstance(value, int) and not isinstance(value, bool) and value > INT_RANGES["int64"][1]:
        raise BadArgument(f"{where} does not fit in int64; write it as uint64:{value}")
    return _typed(value, where)


def _typed(value: Any, where: str) -> Arg:
    try:
        return infer_arg(value, where)
    except ValueError as exc:
        raise BadArgument(one_line(exc)) from None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def parse_eta(text: str) -> datetime:
    """Seconds from now (``5``, ``2.5``) or an ISO-8601 time with a zone, as an aware datetime."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise BadArgument(f"--eta {text}: seconds from now must be a number >= 0")
        return datetime.now(timezone.utc) + timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise BadArgument(
            f"--eta {text!r}: give seconds from now (5, 2.5) or an ISO-8601 time with a zone (2030-01-02T15:04:05Z)"
        ) from None
    if moment.tzinfo is None:
        raise BadArgument(f"--eta {text!r} has no time zone; add Z for UTC or an offset like +02:00")
    return moment


# --------------------------------------------------------------------------- sending


_SEND_EPILOG = """\b
Arguments are JSON: 1 is int64, 1.5 float64, true bool, [1,2] []int64, "x" or a bare
word a string. TYPE:VALUE picks the Go type: int32:5, uint64:18446744073709551615,
[]string:["a","b"], string:007. Negative numbers need no quoting.

\b
Examples:
  machinery send add 1 2
  machinery send add 1 2 --wait --timeout 10
  machinery send -A myapp.tasks:server email "to@example.com" --eta 30
  machinery send report --eta 2030-01-02T15:04:05Z --retry-count 3 --queue reports
  machinery send add 1 2 --group 10000 --wait
  machinery send report 2026 --priority 9 --time-limit 600 --unique-for 3600

--group N sends N copies of the task as one group and prints the group's UUID (a progress
bar shows long sends on a terminal); with --wait it prints how many succeeded and failed.
--wait gives up after 60 s unless --timeout says otherwise (--timeout 0: never); it warns
when no live worker runs the task. The exit code is 0 on SUCCESS, 1 on FAILURE (of any
member of a group) and 2 on timeout."""


@click.command(epilog=_SEND_EPILOG, context_settings={"ignore_unknown_options": True})
@server_options
@click.argument("name")
@click.argument("args", nargs=-1)
@click.option("--eta", metavar="WHEN", help="Run no earlier than WHEN: seconds from now, or an ISO-8601 time.")
@click.option("--retry-count", type=click.IntRange(min=0), default=0, help="Retries on failure.  [default: 0]")
@click.option("-Q", "--queue", metavar="QUEUE", help="Queue to send to  [default: the config's default_queue]")
@click.option(
    "--priority",
    type=click.IntRange(min=0, max=MAX_PRIORITY),
    default=0,
    help=f"0 (lowest) to {MAX_PRIORITY}: higher priorities are taken first.  [default: 0]",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Hard time limit of this run (over the task's and the worker's).",
)
@click.option(
    "--unique-for",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Send nothing if an equal task (same name and arguments) was sent within SECONDS and has not "
    "finished; print that task's UUID instead.",
)
@click.option(
    "--group",
    "group_size",
    type=click.IntRange(min=1),
    metavar="N",
    help="Send N copies of the task as one group; print the group's UUID.",
)
@click.option(
    "--send-concurrency",
    type=click.IntRange(min=0),
    metavar="N",
    help="With --group: publish at most N messages at a time.  [default: 0, unlimited]",
)
@click.option("--wait", is_flag=True, help="Wait for the task (or group) to finish and print its result.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help=f"Give up waiting after SECONDS (implies --wait); 0 waits forever.  [default: {WAIT_TIMEOUT:g}]",
)
@click.pass_context
def send(
    ctx: click.Context,
    name: str,
    args: tuple[str, ...],
    eta: str | None,
    retry_count: int,
    queue: str | None,
    priority: int,
    time_limit: float | None,
    unique_for: float | None,
    group_size: int | None,
    send_concurrency: int | None,
    wait: bool,
    timeout: float | None,
) -> None:
    """Send a task (or --group N copies); print its UUID.

    With --wait, also wait for it and print its result (for a group: how many succeeded).
    """
    task_args = [parse_arg(text, i) for i, text in enumerate(args, 1)]
    when = parse_eta(eta) if eta is not None else None
    if send_concurrency is not None and group_size is None:
        raise BadArgument("--send-concurrency applies to --group N only")
    if unique_for is not None and group_size is not None:
        raise BadArgument("--unique-for applies to single sends, not to --group N")
    controls = {"time_limit": time_limit, "unique_for": unique_for}
    options = {name: value for name, value in controls.items() if value is not None}
    server = get_server(ctx)
    app = app_spec(ctx)
    if app and not server.is_task_registered(name):
        known = ", ".join(sorted(server.tasks)) or "none"
        click.echo(f"Warning: {name!r} is not registered with {app} (registered: {known})", err=True)

    def signature() -> Signature:
        made = Signature(
            name,
            [replace(a) for a in task_args],
            eta=when,
            retry_count=retry_count,
            routing_key=queue or "",
            priority=priority,
        )
        return apply_send_options(made, options)

    target = queue or server.config.default_queue
    waiting = wait or timeout is not None
    limit = (WAIT_TIMEOUT if timeout is None else timeout) or None  # --timeout 0: no limit
    if group_size is not None:
        group = Group(*(signature() for _ in range(group_size)))
        _send_group(server, group, send_concurrency or 0, waiting, limit, target)
        return
    result = server.send_task(signature())
    click.echo(result.task_uuid)
    if not waiting:
        return
    _warn_if_nobody_runs(server, name, target)
    try:
        value = result.get(limit)
    except TaskFailed as exc:
        raise CliError(f"{name} {result.task_uuid} failed: {one_line(exc.error)}") from None
    except TimeoutError:
        current = result.state()
        raise WaitTimeout(
            f"no result within {limit:g} s: {result.task_uuid} is {current.state if current else 'unknown'}; "
            f"is a worker consuming {target!r}? check later with: machinery status {result.task_uuid}"
        ) from None
    click.echo(_show_value(value))


def _warn_if_nobody_runs(server: Server, name: str, queue: str) -> None:
    """Say so when no live worker consuming ``queue`` has ``name`` registered (where the backend
    keeps worker heartbeats; elsewhere nothing can be known, and nothing is said)."""
    try:
        workers = run_sync(server.backend.get_workers())
    except UnsupportedOperation:
        return
    on_queue = [w for w in workers if w.queue == queue]
    if any(name in w.tasks for w in on_queue):
        return
    if on_queue:
        registered = ", ".join(sorted({t for w in on_queue for t in w.tasks})) or "nothing"
        seen = f"{plural(len(on_queue), 'worker')} consume it, registering {registered}"
    else:
        seen = "no worker consumes it"
    click.echo(
        f"Warning: no live worker runs {name!r} from {queue!r} ({seen}); waiting anyway "
        "(start one with: machinery worker -A module:server)",
        err=True,
    )


def _show_value(value: Any) -> str:
    return json_text(list(value) if isinstance(value, tuple) else value)


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator[ProgressHandler | None]:
    """A ``fn(done, total)`` drawing a progress bar, for big groups on a terminal; else None."""
    if total < PROGRESS_MIN or not sys.stdout.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label) as bar:

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.pos)

        yield update


def _send_group(
    server: Server, group: Group, send_concurrency: int, wait: bool, timeout: float | None, target: str
) -> None:
    total = len(group)
    name = group.signatures[0].name
    with _progress(total, f"Publishing {total} tasks") as progress:
        server.send_group(group, send_concurrency, on_progress=progress)
    click.echo(group.group_uuid)
    click.echo(f"Sent {plural(total, name + ' task')} as one group")
    if not wait:
        return
    with _progress(total, f"Waiting for {total} tasks") as progress:
        done, unfinished = _wait_for_all(server, group.task_uuids, timeout, progress)
    succeeded = [s for s in done.values() if s.is_success()]
    failed = [(u, done[u]) for u in group.task_uuids if u in done and done[u].is_failure()]
    values = {_show_value(decode_results(s.results)) for s in succeeded}
    same = f" (each returned {values.pop()})" if len(values) == 1 else ""
    line = f"{len(succeeded)} succeeded{same}, {len(failed)} failed"
    click.echo(line + (f", {len(unfinished)} unfinished" if unfinished else ""))
    if unfinished:
        raise WaitTimeout(
            f"no result within {timeout:g} s for {len(unfinished)} of {total} tasks of {group.group_uuid}; "
            f"is a worker consuming {target!r}? check later with: machinery status {group.group_uuid}"
        )
    if failed:
        first_uuid, first = failed[0]
        raise CliError(
            f"{len(failed)} of {total} tasks of {group.group_uuid} failed; the first, {first_uuid}: "
            f"{one_line(first.error)}"
        )


def _wait_for_all(
    server: Server, task_uuids: Sequence[str], timeout: float | None, progress: ProgressHandler | None
) -> tuple[dict[str, TaskState], list[str]]:
    """Poll until every task is completed or ``timeout`` passes: (completed states, unfinished UUIDs)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done: dict[str, TaskState] = {}
    unfinished = list(task_uuids)
    pause = 0.05
    while True:
        waiting = []
        for task_uuid, state in zip(unfinished, read_states(server, unfinished), strict=True):
            if state is not None and state.is_completed():
                done[task_uuid] = state
            else:
                waiting.append(task_uuid)
        unfinished = waiting
        if progress is not None:
            progress(len(done), len(task_uuids))
        if not unfinished:
            return done, []
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return done, unfinished
            pause = min(pause, left)
        time.sleep(pause)
        pause = min(pause * 1.5, WAIT_POLL_MAX)
