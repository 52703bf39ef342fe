"""Operating a running system: ``inspect`` (the live workers and what each runs), ``purge``
(empty a queue), ``ping`` (do the broker and backend answer)."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from datetime import datetime, timezone
from typing import Any

import click

from .._sync import run_sync
from ..config import redact_url as safe_url
from ..errors import UnsupportedOperation
from .app import CliError, get_server, server_options
from .formatting import echo_table, format_seconds, plural


def _age(moment: datetime) -> str:
    return format_seconds(max(0.0, (datetime.now(timezone.utc) - moment).total_seconds()))


@click.command(epilog="\b\nExample:\n  machinery inspect")
@server_options
@click.pass_context
def inspect(ctx: click.Context) -> None:
    """List the live workers and the tasks each is running.

    Workers are known from their heartbeats: one counts as alive while its heartbeat is
    fresh (heartbeat_timeout). Go workers publish none, so they are not listed.
    """
    server = get_server(ctx, read_only=True)
    try:
        workers = run_sync(server.backend.get_workers())
    except UnsupportedOperation as exc:
        raise CliError(f"cannot list workers: {exc}") from None
    if not workers:
        click.echo("No live workers")
        return
    rows = [
        (w.tag, w.host, str(w.pid), w.queue, f"{len(w.running)}/{w.concurrency}", _age(w.started_at)) for w in workers
    ]
    echo_table(("WORKER", "HOST", "PID", "QUEUE", "RUNNING", "UP"), rows)
    running = [(w.tag, r) for w in workers for r in w.running]
    if running:
        click.echo()
        echo_table(
            ("WORKER", "TASK", "UUID", "RUNNING FOR"),
            [(tag, r.name, r.task_uuid, _age(r.started_at)) for tag, r in running],
        )
    click.echo(f"{plural(len(workers), 'worker')} alive, {plural(len(running), 'task')} running")


@click.command(epilog="\b\nExamples:\n  machinery purge emails\n  machinery purge emails --yes")
@server_options
@click.argument("queue")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, queue: str, yes: bool) -> None:
    """Delete every task waiting in QUEUE.

    Tasks a worker is running, delayed tasks and dead letters are not touched; their
    stored states stay (PENDING for the purged ones).
    """
    server = get_server(ctx, read_only=True)
    depth = _depth(server.broker.queue_depth(queue), queue)
    if depth == 0:
        click.echo(f"{queue} is empty")
        return
    if not yes:
        click.confirm(f"Delete {plural(depth, 'task')} waiting in {queue}?", abort=True)
    removed = _depth(server.broker.purge(queue), queue)
    click.echo(f"Purged {plural(removed, 'task')} from {queue}")


def _depth(operation: Coroutine[Any, Any, int], queue: str) -> int:
    try:
        return run_sync(operation)
    except UnsupportedOperation as exc:
        raise CliError(f"cannot purge {queue}: {exc}") from None


@click.command(epilog="\b\nExample:\n  machinery ping && echo up")
@server_options
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that the broker and the result backend answer.

    Exits 0 when both answer, 1 when either does not."""
    server = get_server(ctx)
    failed = False
    for what, url, call in (
        ("broker", server.config.broker, server.broker.ping),
        ("backend", server.config.result_backend_url, server.backend.ping),
    ):
        started = time.perf_counter()
        try:
            run_sync(call())
        except Exception as exc:
            failed = True
            click.echo(f"{what:<8} {safe_url(url)}: no answer ({type(exc).__name__}: {exc})")
            continue
        click.echo(f"{what:<8} {safe_url(url)}: ok in {format_seconds(time.perf_counter() - started)}")
    if failed:
        raise click.exceptions.Exit(1)
