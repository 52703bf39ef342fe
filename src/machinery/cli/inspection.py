"""Looking at what the broker and backend hold: ``status``, ``pending``, ``delayed``, ``dead``,
and ``requeue-dead``, which puts the dead letters back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click

from .._sync import run_sync
from ..config import redact_url as safe_url
from ..errors import MachineryError, UnsupportedOperation
from ..server import Server
from ..signature import Signature
from .app import CliError, get_server, read_states, server_options
from .formatting import echo_table, format_args, format_moment, format_time, json_text, plural, shorten, style_state

T = TypeVar("T")

_STATUS_EPILOG = """\b
Examples:
  machinery status task_0e2d4ac2-7f7e-4b7c-8a8e-3b6c0e1f9a11
  machinery status group_5b1d3c0e-2f4a-4d7e-9c1b-6a8f0e2d4c13

A chain's steps and a chord's members are tasks like any other: their stored state does not
say which workflow they belong to. A group UUID lists the group's members."""


def _limit_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help=help_text)


_LIMIT = _limit_option("Show at most this many (0: all).")


def _limited(items: Sequence[T], limit: int) -> tuple[Sequence[T], str]:
    """The first ``limit`` items (all of them when ``limit`` is 0), and a note if some were left out."""
    if limit and len(items) > limit:
        return items[:limit], f" (showing the first {limit}; --limit 0 shows all)"
    return items, ""


def _echo_fields(fields: Sequence[tuple[str, str]]) -> None:
    """``key      value`` lines, the values aligned."""
    for key, value in fields:
        click.echo(f"{key:<8} {value}")


def _created(moment: datetime | None) -> str:
    return format_moment(moment, gap="  ") if moment else "-"


def _server_and_queue(ctx: click.Context, queue: str | None, read_only: bool = True) -> tuple[Server, str]:
    """The command's Server, and the QUEUE argument or else the config's default queue."""
    server = get_server(ctx, read_only=read_only)
    return server, queue or server.config.default_queue


def _echo_listing(
    items: Sequence[T], limit: int, headers: Sequence[str], row: Callable[[T], Sequence[str]], summary: str
) -> None:
    """A table of at most ``limit`` items, then ``summary`` (with the ``--limit`` note, if any)."""
    shown, note = _limited(items, limit)
    if shown:
        echo_table(headers, [row(item) for item in shown])
    click.echo(f"{summary}{note}")


# --------------------------------------------------------------------------- status


@click.command(epilog=_STATUS_EPILOG)
@server_options
@click.argument("task_uuid", metavar="UUID")
@_limit_option("For a group: show at most this many members (0: all).")
@click.pass_context
def status(ctx: click.Context, task_uuid: str, limit: int) -> None:
    """Show a task's state and result, or a group's members.

    For a task: the state, the task name, when it was created, and its results (with their
    Go types) or its error with the traceback; while it runs, its latest progress. For a group
    (group_...): each member's UUID, task, state and result or error in group order, and
    whether a chord was triggered on the group.
    """
    server = get_server(ctx, read_only=True)
    if task_uuid.startswith("group_"):
        _group_status(server, task_uuid, limit)
        return
    state = run_sync(server.backend.get_state(task_uuid))
    is_callback = task_uuid.startswith("chord_")
    if state is None:
        why = "never sent there, or expired"
        if is_callback:
            why = "a chord's callback has none until its group has finished; or it was never sent there, or expired"
        raise CliError(
            f"no state for {task_uuid} in {safe_url(server.config.result_backend_url)}: {why} "
            f"(results live {server.config.results_ttl} s)"
        )
    fields = [
        ("uuid", state.task_uuid or task_uuid),
        ("state", style_state(state.state)),
        ("task", state.task_name or "-"),
        ("created", _created(state.created_at)),
    ]
    if state.results:
        shown = ", ".join(f"{json_text(r.value)} ({r.type})" for r in state.results)
        fields.append(("results" if len(state.results) > 1 else "result", shown))
    elif state.is_success():
        fields.append(("result", "none"))
    if state.error:
        fields.append(("error", click.style(state.error, fg="red")))
    result = server.result(task_uuid)
    progress = result.progress()
    if progress is not None and not state.is_completed():
        fraction, message = progress
        fields.append(("progress", f"{fraction:.0%}" + (f" {message}" if message else "")))
    if is_callback:
        fields.append(("workflow", "a chord's callback: sent once every member of its group succeeded"))
    _echo_fields(fields)
    traceback = result.traceback() if state.is_failure() else None
    if traceback:
        click.echo(traceback.rstrip("\n"))


def _group_status(server: Server, group_uuid: str, limit: int) -> None:
    meta = run_sync(server.backend.get_group_meta(group_uuid))
    if meta is None:
        raise CliError(
            f"no group {group_uuid} in {safe_url(server.config.result_backend_url)}: never sent there, "
            f"or expired (groups live {server.config.results_ttl} s, as results do)"
        )
    members = meta.task_uuids
    states = read_states(server, members)
    counts = Counter(s.state if s is not None else "no state" for s in states)
    tally = ", ".join(f"{n} {style_state(state)}" for state, n in counts.most_common())
    if meta.chord_triggered:
        chord = "triggered (ChordTriggered: its callback was sent, or recorded as failed)"
    else:
        chord = "not triggered (ChordTriggered: set once a chord's members all finished; a plain group never sets it)"
    _echo_fields(
        [
            ("group", meta.group_uuid or group_uuid),
            ("members", f"{len(members)}" + (f" ({tally})" if tally else "")),
            ("chord", chord),
            ("created", _created(meta.created_at)),
        ]
    )
    pairs, note = _limited(list(zip(members, states, strict=True)), limit)
    if not pairs:
        return
    click.echo()
    table = []
    for index, (member_uuid, state) in enumerate(pairs, 1):
        if state is None:
            table.append((str(index), member_uuid, "-", "-", "no stored state (expired?)"))
            continue
        if state.error:
            outcome = state.error
        elif state.results:
            outcome = ", ".join(json_text(r.value) for r in state.results)
        else:
            outcome = "none" if state.is_success() else ""
        table.append((str(index), member_uuid, state.task_name or "-", state.state, shorten(outcome)))
    echo_table(("#", "UUID", "TASK", "STATE", "RESULT OR ERROR"), table)
    if note:
        click.echo(f"{plural(len(members), 'member')}{note}")


# --------------------------------------------------------------------------- queues


@click.command(epilog="\b\nExamples:\n  machinery pending\n  machinery pending emails --limit 10")
@server_options
@click.argument("queue", required=False)
@_LIMIT
@click.pass_context
def pending(ctx: click.Context, queue: str | None, limit: int) -> None:
    """List the tasks waiting in a queue.

    QUEUE defaults to the config's default_queue. Messages that are not valid task
    messages are not listed (a worker moves them to the dead letters).
    """
    server, name = _server_and_queue(ctx, queue)
    tasks = server.get_pending_tasks(name)
    _echo_listing(
        tasks,
        limit,
        ("UUID", "TASK", "ARGS"),
        lambda s: (s.uuid, s.name, shorten(format_args(s.args))),
        f"{plural(len(tasks), 'task')} pending in {name}",
    )


@click.command(epilog="\b\nExample:\n  machinery delayed")
@server_options
@_LIMIT
@click.pass_context
def delayed(ctx: click.Context, limit: int) -> None:
    """List the tasks waiting for their ETA, soonest first."""
    server = get_server(ctx, read_only=True)
    tasks = server.get_delayed_tasks()
    _echo_listing(
        tasks,
        limit,
        ("UUID", "TASK", "ARGS", "QUEUE", "ETA"),
        lambda s: (s.uuid, s.name, shorten(format_args(s.args)), s.routing_key, format_moment(s.eta)),
        f"{plural(len(tasks), 'task')} delayed",
    )


@click.command(epilog="\b\nExamples:\n  machinery dead\n  machinery dead emails")
@server_options
@click.argument("queue", required=False)
@_LIMIT
@click.option("--purge", "purge_them", is_flag=True, help="Delete the dead letters instead of listing them.")
@click.option("-y", "--yes", is_flag=True, help="With --purge: do not ask for confirmation.")
@click.pass_context
def dead(ctx: click.Context, queue: str | None, limit: int, purge_them: bool, yes: bool) -> None:
    """List a queue's dead letters with why each failed.

    Dead letters are messages a worker could not process (not JSON, not a task message).
    QUEUE defaults to the config's default_queue. With --purge they are deleted instead
    (after a confirmation, unless --yes).
    """
    server, name = _server_and_queue(ctx, queue)
    if purge_them:
        _purge_dead(server, name, yes)
        return
    letters = server.dead_letters(name)
    _echo_listing(
        letters,
        limit,
        ("TIME", "REASON", "MESSAGE"),
        lambda d: (format_time(d.time), shorten(d.reason, 50), _describe_body(d.body)),
        f"{plural(len(letters), 'dead letter')} in {name}",
    )
    if letters:
        click.echo(f"Put them back on the queue with: machinery requeue-dead {name}")


def _purge_dead(server: Server, queue: str, yes: bool) -> None:
    try:
        count = run_sync(server.broker.dead_count(queue))
        if count == 0:
            click.echo(f"No dead letters in {queue}")
            return
        if not yes:
            click.confirm(f"Delete {plural(count, 'dead letter')} of {queue}?", abort=True)
        removed = run_sync(server.broker.purge_dead(queue))
    except UnsupportedOperation as exc:
        raise CliError(f"cannot purge the dead letters of {queue}: {exc}") from None
    click.echo(f"Purged {plural(removed, 'dead letter')} from {queue}")


def _describe_body(body: bytes) -> str:
    try:
        signature = Signature.decode(body)
    except MachineryError:
        return shorten(body.decode("utf-8", "backslashreplace"))
    return shorten(f"{signature.uuid} {signature.name}({format_args(signature.args)})")


@click.command("requeue-dead", epilog="\b\nExamples:\n  machinery requeue-dead\n  machinery requeue-dead emails")
@server_options
@click.argument("queue", required=False)
@click.pass_context
def requeue_dead(ctx: click.Context, queue: str | None) -> None:
    """Put a queue's dead letters back on the queue."""
    server, name = _server_and_queue(ctx, queue, read_only=False)
    count = server.requeue_dead(name)
    click.echo(f"Requeued {plural(count, 'dead letter')} to {name}")
