"""The commands that run things: ``worker``, the ``periodic`` scheduler, and the ``demo``."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import click

from .. import log
from ..config import redact_url as safe_url
from ..errors import MissingExtra
from ..periodic import LOCK_PREFIX, PeriodicEntry
from ..server import Server
from ..worker import POOLS
from .app import CliError, app_spec, get_server, is_connection_error, server_options, unreachable_message
from .formatting import echo_table, format_args, format_moment, plural, shorten

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_LOGLEVEL = click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Log level (the log goes to stderr).",
)


def setup_logging(level: str) -> None:
    """Log machinery's records to stderr as ``time LEVEL message`` at ``level``."""
    logger = logging.getLogger("machinery")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_machinery_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._machinery_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


# --------------------------------------------------------------------------- worker


_WORKER_EPILOG = """\b
Examples:
  machinery worker -A examples.tasks:server
  machinery worker -A myapp.tasks:server -c 8 -Q emails --loglevel debug
  machinery worker -A myapp.tasks:server --no-periodic
  machinery worker -A myapp.tasks:server --pool processes -c 4 --time-limit 300 --max-tasks-per-child 100
  BROKER=redis://localhost:6379/0 machinery worker -A myapp.tasks:server

The worker also fires the app's periodic entries (each tick once across every worker and
scheduler running them); --no-periodic leaves that to others, e.g. 'machinery periodic'.
SIGINT or SIGTERM finishes the running tasks and stops; a second one stops at once
(unfinished tasks go back to the queue, and a process that still runs a def task on a
thread exits, so that the task never runs twice at once).

Time limits need --pool processes to stop a def task: on threads, Python cannot stop a
thread, so the worker stops waiting, records the failure, and the thread runs on."""


@click.command(epilog=_WORKER_EPILOG)
@server_options
@click.option(
    "-c", "--concurrency", type=click.IntRange(min=0), default=0, help="Tasks run at once  [default: 2 x CPUs]"
)
@click.option("-Q", "--queue", metavar="QUEUE", help="Queue to consume  [default: the config's default_queue]")
@click.option("-n", "--tag", "consumer_tag", metavar="TAG", default="", help="Consumer tag  [default: host:pid:random]")
@_LOGLEVEL
@click.option(
    "--periodic/--no-periodic",
    default=True,
    help="Also run the app's periodic scheduler (its registered periodic tasks and workflows).  [default: on]",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default="threads",
    show_default=True,
    help="Where def tasks run: threads of this process, or child processes (CPU-bound work, killable on "
    "a hard time limit). async def tasks always run on the worker's event loop.",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Hard time limit for tasks that set none: the task is stopped and fails (or retries).",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Soft time limit for tasks that set none: SoftTimeLimitExceeded is raised inside the task.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --pool processes: replace a child process after it has run N tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=click.FloatRange(min=0, min_open=True),
    metavar="MB",
    help="With --pool processes: replace a child process once its resident memory passes MB after a task.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (needs machinery[metrics]).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics endpoint listens on.")
@click.pass_context
def worker(
    ctx: click.Context,
    concurrency: int,
    queue: str | None,
    consumer_tag: str,
    loglevel: str,
    periodic: bool,
    pool: str,
    time_limit: float | None,
    soft_time_limit: float | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: float | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run a worker that consumes a queue and runs its tasks."""
    setup_logging(loglevel)
    server = get_server(ctx, need_app=True)
    if metrics_port is not None:
        _serve_metrics(server, metrics_host, metrics_port)
    server.new_worker(
        consumer_tag,
        concurrency,
        queue,
        periodic=periodic,
        pool=pool,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
    ).launch()


def _serve_metrics(server: Server, host: str, port: int) -> None:
    """Add the metrics middleware (unless the app has it) and serve ``/metrics``."""
    try:
        from ..metrics import MetricsMiddleware, serve
    except MissingExtra as exc:
        raise CliError(str(exc)) from None
    if not any(isinstance(m, MetricsMiddleware) for m in server.middleware.middleware):
        server.add_middleware(MetricsMiddleware())
    try:
        http = serve(port, host)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    log.logger.info("Serving Prometheus metrics on http://%s:%d/metrics", host, http.server_port)


# --------------------------------------------------------------------------- periodic


_PERIODIC_EPILOG = """\b
Examples:
  machinery periodic -A myapp.tasks:server
  machinery periodic -A myapp.tasks:server --list
  machinery periodic -A myapp.tasks:server --loglevel debug

Runs the periodic tasks and workflows the app registers (server.register_periodic_task,
_chain, _group, _chord), and no worker. Workers run them too unless started with
--no-periodic; however many processes run an entry, each tick fires once (through the
config's lock). SIGINT or SIGTERM stops it."""


@click.command(epilog=_PERIODIC_EPILOG)
@server_options
@click.option("--list", "list_only", is_flag=True, help="List the app's periodic entries and exit.")
@_LOGLEVEL
@click.pass_context
def periodic(ctx: click.Context, list_only: bool, loglevel: str) -> None:
    """Fire the app's periodic tasks and workflows (no worker)."""
    if not list_only:
        setup_logging(loglevel)
    server = get_server(ctx, need_app=True)
    app = app_spec(ctx)
    entries = server.periodic_entries()
    if list_only:
        if entries:
            echo_entries(entries)
        click.echo(f"{_count_entries(len(entries))} registered by {app}")
        return
    if not entries:
        raise CliError(
            f"{app} registers no periodic tasks or workflows: nothing to run; register them with "
            "server.register_periodic_task(spec, name, signature) and its _chain, _group, _chord twins"
        )
    echo_entries(entries)
    key = server.periodic.lock_key(entries[0])
    program = key[len(LOCK_PREFIX) : len(key) - len(entries[0].name) - len(entries[0].spec)]
    click.echo(f"Running {_count_entries(len(entries))}; SIGINT or SIGTERM stops.")
    click.echo(
        f"Each tick fires once across the schedulers sharing the lock {safe_url(server.config.lock_url)} "
        f"as program {program!r} (Config.periodic_lock_program)."
    )
    with contextlib.suppress(KeyboardInterrupt):  # no signal handlers when the config says no_unix_signals
        server.run_periodic()
    click.echo("Periodic scheduler stopped.")


def _count_entries(count: int) -> str:
    return plural(count, "periodic entry", "periodic entries")


def echo_entries(entries: Sequence[PeriodicEntry]) -> None:
    """A table of periodic entries: name, kind, spec, next run, and what each tick sends."""
    now = datetime.now(timezone.utc)
    rows = []
    for entry in entries:
        upcoming = entry.next_run
        if upcoming is not None and upcoming <= now:  # the scheduler moves it on when it runs
            upcoming = entry.schedule.next(now)
        when = format_moment(upcoming) if upcoming is not None else "never"
        rows.append((entry.name, entry.kind, entry.spec, when, shorten(describe_entry(entry))))
    echo_table(("NAME", "KIND", "SPEC", "NEXT RUN", "SENDS"), rows)


def describe_entry(entry: PeriodicEntry) -> str:
    """What a periodic entry sends on each tick, e.g. ``[add(1, 1), add(5, 5)] -> multiply()``."""
    calls = [f"{s.name}({format_args(s.args)})" for s in entry.signatures]
    if entry.kind == "chain":
        return " -> ".join(calls)
    if entry.kind in ("group", "chord"):
        members = f"[{', '.join(calls)}]"
        if entry.callback is None:
            return members
        return f"{members} -> {entry.callback.name}({format_args(entry.callback.args)})"
    return calls[0]


# --------------------------------------------------------------------------- demo


_DEMO_EPILOG = """\b
Examples:
  machinery demo
  machinery demo --broker redis://localhost:6379/0
  machinery demo --broker https://sqs.us-east-2.amazonaws.com/123456789012 --backend https://dynamodb.us-east-2.amazonaws.com
  machinery demo --broker gcppubsub://my-project/demo --backend redis://localhost:6379/0"""


@click.command(epilog=_DEMO_EPILOG)
@click.option(
    "--broker", metavar="URL", help="Broker and backend URL  [default: a SQLite file in a temporary directory]"
)
@click.option("--backend", metavar="URL", help="Result backend URL  [default: the broker's]")
@click.option("-v", "--verbose", is_flag=True, help="Also show the worker's log on stderr.")
def demo(broker: str | None, backend: str | None, verbose: bool) -> None:
    """Run a worker, example tasks, workflows and a periodic task.

    In this process: single tasks (with an ETA, retries, RetryTaskLater), the chain
    add(1, 1) -> add(5, 5) -> multiply(4) = 48, the group [add(1, 1), add(5, 5)] = [2, 10],
    the chord of that group into multiply() = 20, and a periodic task on '@every 1s' until
    it has ticked 3 times. Each result is shown with the states its tasks went through.
    Exits 1 if a result is not what it should be.
    """
    from .demo import run_demo

    if verbose:
        setup_logging("info")
    try:
        ok = run_demo(broker, verbose=verbose, backend=backend)
    except Exception as exc:
        if broker is not None and is_connection_error(exc):
            raise CliError(unreachable_message(broker, broker, exc)) from None
        raise
    if not ok:
        raise CliError("the demo did not get the results it expected (see above)")
