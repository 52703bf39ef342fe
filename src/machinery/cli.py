"""The ``machinery`` command line: run a worker, send tasks, inspect queues and states, run the demo.

Every command finds its Server the same way: ``-A module:attr`` names one in your code,
``--config FILE.yml`` reads a Go Machinery YAML file, and otherwise the environment is read
(``BROKER``, ``RESULT_BACKEND``, ...), falling back to the embedded SQLite file. Errors are
one line that says what to do, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import click

from . import __version__
from ._sync import run_sync
from .config import Config
from .errors import BrokerConnectionError, ConfigError, MachineryError, TaskFailed
from .periodic import LOCK_PREFIX, PeriodicEntry
from .server import Server
from .signature import Group, Signature
from .state import FAILURE, RETRY, SUCCESS, TaskState
from .types import BYTE_SLICE_TYPES, GO_TYPES, INT_RANGES, Arg, decode_results, infer_arg, infer_type
from .worker import _safe_url as safe_url
from .workflow import ProgressHandler

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CELL_WIDTH = 60
"""Longest text a table cell shows before it is cut with an ellipsis."""


# --------------------------------------------------------------------------- errors


class CliError(click.ClickException):
    """A one-line error shown as ``Error: message``, exit code 1."""


class BadArgument(CliError):
    """An argument or option the command cannot use; exit code 2, like click's usage errors."""

    exit_code = 2


class WaitTimeout(CliError):
    """``send --wait`` gave up before the task finished; exit code 2."""

    exit_code = 2


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean a broker or backend could not be reached or opened."""
    if isinstance(exc, (BrokenPipeError, click.ClickException)):
        return False
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        return False
    kinds: list[type[BaseException]] = [OSError, BrokerConnectionError, sqlite3.OperationalError]
    # Client libraries are consulted only if something already imported them.
    if "redis" in sys.modules:
        import redis.exceptions

        kinds += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    if "aiormq" in sys.modules:
        import aiormq.exceptions

        kinds.append(aiormq.exceptions.AMQPConnectionError)
    return isinstance(exc, tuple(kinds))


class _Group(click.Group):
    """Turns the errors every command can meet into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if is_connection_error(exc):
                raise CliError(_unreachable(ctx, exc)) from None
            if isinstance(exc, MachineryError):
                raise CliError(_one_line(exc)) from None
            raise


def _unreachable(ctx: click.Context, exc: BaseException) -> str:
    state = ctx.find_object(_State)
    if state is None or state.server is None:
        return unreachable_message(None, None, exc)
    return unreachable_message(state.server.config.broker, state.server.config.result_backend_url, exc)


def unreachable_message(broker: str | None, backend: str | None, exc: BaseException) -> str:
    """One line saying which URL could not be reached, why, and what to check."""
    detail = (_one_line(exc) or type(exc).__name__).rstrip(".")
    if broker is None:
        return f"cannot reach the broker: {detail}"
    backend = backend or broker
    if broker == backend:
        where = safe_url(broker)
    else:
        where = f"the broker {safe_url(broker)} or the result backend {safe_url(backend)}"
    if broker.startswith("sqlite:") and backend.startswith("sqlite:"):
        hint = "check that the path is right and writable"
    else:
        hint = "check that the server is running and the URL is right (BROKER, --config or -A)"
    return f"cannot reach {where}: {detail}; {hint}"


# --------------------------------------------------------------------------- finding the Server


@dataclass
class _State:
    app: str | None = None
    config: str | None = None
    server: Server | None = None


def _remember(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(ctx.ensure_object(_State), field, value)

    return callback


def server_options(fn: F) -> F:
    """Add ``-A/--app`` and ``--config`` (accepted before or after the command name)."""
    fn = click.option(
        "--config",
        "config_file",
        metavar="FILE.yml",
        expose_value=False,
        is_eager=True,
        callback=_remember("config"),
        help="Read a Go Machinery YAML config file instead of the environment.",
    )(fn)
    fn = click.option(
        "-A",
        "--app",
        metavar="MODULE:ATTR",
        expose_value=False,
        is_eager=True,
        callback=_remember("app"),
        help="Your machinery Server, e.g. myapp.tasks:server (imported from the current directory).",
    )(fn)
    return fn


def get_server(ctx: click.Context, need_app: bool = False) -> Server:
    """The Server named by -A, or one built from --config or the environment (made once)."""
    state = ctx.ensure_object(_State)
    if state.server is not None:
        return state.server
    if state.app and state.config:
        raise BadArgument("give -A/--app or --config, not both: the app's Server carries its own configuration")
    if state.app:
        state.server = load_app(state.app)
    elif need_app:
        raise BadArgument(
            f"'machinery {ctx.info_name}' needs -A MODULE:ATTR naming the Server whose tasks it runs, "
            "e.g. -A examples.tasks:server"
        )
    else:
        try:
            config = Config.from_yaml(state.config) if state.config else Config.from_env()
            state.server = Server(config)
        except ConfigError as exc:
            message = _one_line(exc)
            if not state.config:
                message += " (from the environment)"
            elif state.config not in message:
                message += f" (from --config {state.config})"
            raise CliError(message) from None
    ctx.call_on_close(_closer(state.server))
    return state.server


def _closer(server: Server) -> Callable[[], None]:
    def close() -> None:
        with contextlib.suppress(Exception):  # nothing useful to say about a connection we are done with
            server.close()

    return close


def load_app(spec: str) -> Server:
    """Import ``module:attr`` (or ``path/to/file.py:attr``) from the current directory; return the Server.

    Without ``:attr`` the module's ``server`` attribute is used, or its only Server.
    Raises ``CliError`` with one line saying what is wrong.
    """
    module_name, _, attr = spec.partition(":")
    if module_name.endswith(".py"):
        module_name = module_name[:-3].replace(os.sep, ".").replace("/", ".").strip(".")
    if not module_name:
        raise BadArgument(f"-A {spec!r} names no module; write it as module:attr, e.g. myapp.tasks:server")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise CliError(
                f"cannot import {module_name!r}: {exc}; run from your project directory or check -A"
            ) from None
        raise CliError(
            f"cannot import {module_name!r}: it imports {missing!r}, which is not installed ({exc})"
        ) from None
    except ConfigError as exc:
        raise CliError(f"{_one_line(exc)} (while importing {module_name!r})") from None
    except Exception as exc:
        raise CliError(f"cannot import {module_name!r}: {type(exc).__name__}: {_one_line(exc)}{_where(exc)}") from None

    servers = sorted(name for name, value in vars(module).items() if isinstance(value, Server))
    found = f" (Servers in it: {', '.join(servers)})" if servers else " (it defines no Server)"
    if not attr:
        if "server" in servers or len(servers) == 1:
            attr = "server" if "server" in servers else servers[0]
        else:
            raise BadArgument(f"-A {spec!r}: say which Server to use, as {module_name}:NAME{found}")
    if not hasattr(module, attr):
        raise BadArgument(f"module {module_name!r} has no attribute {attr!r}{found}; check -A")
    value = getattr(module, attr)
    if not isinstance(value, Server):
        raise BadArgument(
            f"-A {spec!r} is a {type(value).__name__}, not a machinery Server{found}; point -A at the Server"
        )
    return value


def _where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return ""  # its message already names the file and line
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


# --------------------------------------------------------------------------- formatting


def setup_logging(level: str) -> None:
    """Log machinery's records to stderr as ``time LEVEL message`` at ``level``."""
    logger = logging.getLogger("machinery")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_machinery_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._machinery_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def _json(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def format_arg(arg: Arg) -> str:
    """An argument as ``send`` accepts it: the JSON value, with ``type:`` when not the default type."""
    text = _json(arg.value)
    try:
        default = infer_type(arg.value, "") if arg.value is not None else None
    except ValueError:
        default = None
    return text if default == arg.type else f"{arg.type}:{text}"


def format_args(args: Sequence[Arg] | None) -> str:
    return ", ".join(format_arg(a) for a in args or ())


def _cut(text: str, width: int = CELL_WIDTH) -> str:
    text = _one_line(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_seconds(seconds: float) -> str:
    """``2.5 ms``, ``3.2 s``, ``4 min``, ``2.1 h``, ``3 days``."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _relative(moment: datetime | None) -> str:
    if moment is None:
        return ""
    delta = (moment - datetime.now(timezone.utc)).total_seconds()
    return f"in {format_seconds(delta)}" if delta > 0 else f"{format_seconds(delta)} ago"


STATE_COLOURS = {SUCCESS: "green", FAILURE: "red", RETRY: "yellow"}


def style_state(state: str) -> str:
    return click.style(state, fg=STATE_COLOURS.get(state, "cyan"), bold=True)


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows under bold headers in aligned columns (plain text when piped)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)).rstrip()

    click.echo(click.style(line(headers), bold=True))
    for row in rows:
        click.echo(line(row))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _limited(items: Sequence[Any], limit: int) -> tuple[Sequence[Any], str]:
    if limit and len(items) > limit:
        return items[:limit], f" (showing the first {limit}; --limit 0 shows all)"
    return items, ""


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
        raise BadArgument(_one_line(exc)) from None


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


# --------------------------------------------------------------------------- commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="machinery")
@server_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """machinery: a distributed task queue, wire-compatible with Go Machinery.

    Each command finds its Server from -A MODULE:ATTR (your code), --config FILE.yml
    (Go Machinery's YAML), or the environment (BROKER, RESULT_BACKEND, DEFAULT_QUEUE, ...).
    With none of them the broker and backend are the SQLite file machinery.db in the
    current directory, so a worker in one terminal and send in another just work.
    """
    ctx.ensure_object(_State)


_WORKER_EPILOG = """\b
Examples:
  machinery worker -A examples.tasks:server
  machinery worker -A myapp.tasks:server -c 8 -Q emails --loglevel debug
  machinery worker -A myapp.tasks:server --no-periodic
  BROKER=redis://localhost:6379/0 machinery worker -A myapp.tasks:server

The worker also fires the app's periodic entries (each tick once across every worker and
scheduler running them); --no-periodic leaves that to others, e.g. 'machinery periodic'.
SIGINT or SIGTERM finishes the running tasks and stops; a second one stops at once
(unfinished tasks go back to the queue)."""


@main.command(epilog=_WORKER_EPILOG)
@server_options
@click.option(
    "-c", "--concurrency", type=click.IntRange(min=0), default=0, help="Tasks run at once  [default: 2 x CPUs]"
)
@click.option("-Q", "--queue", metavar="QUEUE", help="Queue to consume  [default: the config's default_queue]")
@click.option("-n", "--tag", "consumer_tag", metavar="TAG", default="", help="Consumer tag  [default: host:pid:random]")
@click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Log level (the log goes to stderr).",
)
@click.option(
    "--periodic/--no-periodic",
    default=True,
    help="Also run the app's periodic scheduler (its registered periodic tasks and workflows).  [default: on]",
)
@click.pass_context
def worker(
    ctx: click.Context, concurrency: int, queue: str | None, consumer_tag: str, loglevel: str, periodic: bool
) -> None:
    """Run a worker that consumes a queue and runs its tasks."""
    setup_logging(loglevel)
    server = get_server(ctx, need_app=True)
    server.new_worker(consumer_tag, concurrency, queue, periodic=periodic).launch()


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

--group N sends N copies of the task as one group and prints the group's UUID (a progress
bar shows long sends on a terminal); with --wait it prints how many succeeded and failed.
With --wait the exit code is 0 on SUCCESS, 1 on FAILURE (of any member of a group) and 2
on timeout."""


@main.command(epilog=_SEND_EPILOG, context_settings={"ignore_unknown_options": True})
@server_options
@click.argument("name")
@click.argument("args", nargs=-1)
@click.option("--eta", metavar="WHEN", help="Run no earlier than WHEN: seconds from now, or an ISO-8601 time.")
@click.option("--retry-count", type=click.IntRange(min=0), default=0, help="Retries on failure.  [default: 0]")
@click.option("-Q", "--queue", metavar="QUEUE", help="Queue to send to  [default: the config's default_queue]")
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
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Give up waiting (implies --wait).",
)
@click.pass_context
def send(
    ctx: click.Context,
    name: str,
    args: tuple[str, ...],
    eta: str | None,
    retry_count: int,
    queue: str | None,
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
    server = get_server(ctx)
    state = ctx.ensure_object(_State)
    if state.app and not server.is_task_registered(name):
        known = ", ".join(sorted(server.tasks)) or "none"
        click.echo(f"Warning: {name!r} is not registered with {state.app} (registered: {known})", err=True)

    def signature() -> Signature:
        return Signature(
            name, [replace(a) for a in task_args], eta=when, retry_count=retry_count, routing_key=queue or ""
        )

    target = queue or server.config.default_queue
    if group_size is not None:
        group = Group(*(signature() for _ in range(group_size)))
        _send_group(server, group, send_concurrency or 0, wait or timeout is not None, timeout, target)
        return
    result = server.send_task(signature())
    click.echo(result.task_uuid)
    if not (wait or timeout is not None):
        return
    try:
        value = result.get(timeout)
    except TaskFailed as exc:
        raise CliError(f"{name} {result.task_uuid} failed: {_one_line(exc.error)}") from None
    except TimeoutError:
        current = result.state().state
        raise WaitTimeout(
            f"no result within {timeout:g} s: {result.task_uuid} is {current}; is a worker consuming "
            f"{target!r}? check later with: machinery status {result.task_uuid}"
        ) from None
    click.echo(_show_value(value))


PROGRESS_MIN = 1000
"""Groups at least this big show progress bars (on a terminal)."""
WAIT_BATCH = 5000
"""States read per round trip while waiting for a group."""
WAIT_POLL_MAX = 0.5
"""Longest pause (seconds) between two looks at a group's states."""


def _show_value(value: Any) -> str:
    return _json(list(value) if isinstance(value, tuple) else value)


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
    click.echo(f"Sent {_plural(total, name + ' task')} as one group")
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
            f"{_one_line(first.error)}"
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
        for start in range(0, len(unfinished), WAIT_BATCH):
            batch = unfinished[start : start + WAIT_BATCH]
            for task_uuid, state in zip(batch, run_sync(server.backend.get_states(batch)), strict=True):
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


_STATUS_EPILOG = """\b
Examples:
  machinery status task_0e2d4ac2-7f7e-4b7c-8a8e-3b6c0e1f9a11
  machinery status group_5b1d3c0e-2f4a-4d7e-9c1b-6a8f0e2d4c13

A chain's steps and a chord's members are tasks like any other: their stored state does not
say which workflow they belong to. A group UUID lists the group's members."""

_LIMIT = click.option(
    "--limit", type=click.IntRange(min=0), default=100, show_default=True, help="Show at most this many (0: all)."
)


@main.command(epilog=_STATUS_EPILOG)
@server_options
@click.argument("task_uuid", metavar="UUID")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="For a group: show at most this many members (0: all).",
)
@click.pass_context
def status(ctx: click.Context, task_uuid: str, limit: int) -> None:
    """Show a task's state and result, or a group's members.

    For a task: the state, the task name, when it was created, and its results (with their
    Go types) or its error. For a group (group_...): each member's UUID, task, state and
    result or error in group order, and whether a chord was triggered on the group.
    """
    server = get_server(ctx)
    if task_uuid.startswith("group_"):
        _group_status(server, task_uuid, limit)
        return
    state = server.backend.get_state(task_uuid)
    is_callback = task_uuid.startswith("chord_")
    if state is None:
        why = "never sent there, or expired"
        if is_callback:
            why = "a chord's callback has none until its group has finished; or it was never sent there, or expired"
        raise CliError(
            f"no state for {task_uuid} in {safe_url(server.config.result_backend_url)}: {why} "
            f"(results live {server.config.results_ttl} s)"
        )
    rows = [
        ("uuid", state.task_uuid or task_uuid),
        ("state", style_state(state.state)),
        ("task", state.task_name or "-"),
        ("created", f"{format_time(state.created_at)}  ({_relative(state.created_at)})" if state.created_at else "-"),
    ]
    if state.results:
        shown = ", ".join(f"{_json(r.value)} ({r.type})" for r in state.results)
        rows.append(("results" if len(state.results) > 1 else "result", shown))
    elif state.is_success():
        rows.append(("result", "none"))
    if state.error:
        rows.append(("error", click.style(state.error, fg="red")))
    if is_callback:
        rows.append(("workflow", "a chord's callback: sent once every member of its group succeeded"))
    for key, value in rows:
        click.echo(f"{key:<8} {value}")


def _group_status(server: Server, group_uuid: str, limit: int) -> None:
    meta = server.backend.get_group_meta(group_uuid)
    if meta is None:
        raise CliError(
            f"no group {group_uuid} in {safe_url(server.config.result_backend_url)}: never sent there, "
            f"or expired (groups live {server.config.results_ttl} s, as results do)"
        )
    members = meta.task_uuids
    states: list[TaskState | None] = []
    for start in range(0, len(members), WAIT_BATCH):
        states += run_sync(server.backend.get_states(members[start : start + WAIT_BATCH]))
    counts = Counter(s.state if s is not None else "no state" for s in states)
    tally = ", ".join(f"{n} {style_state(state)}" for state, n in counts.most_common())
    if meta.chord_triggered:
        chord = "triggered (ChordTriggered: its callback was sent, or recorded as failed)"
    else:
        chord = "not triggered (ChordTriggered: set once a chord's members all finished; a plain group never sets it)"
    rows = [
        ("group", meta.group_uuid or group_uuid),
        ("members", f"{len(members)}" + (f" ({tally})" if tally else "")),
        ("chord", chord),
        ("created", f"{format_time(meta.created_at)}  ({_relative(meta.created_at)})" if meta.created_at else "-"),
    ]
    for key, value in rows:
        click.echo(f"{key:<8} {value}")
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
            outcome = ", ".join(_json(r.value) for r in state.results)
        else:
            outcome = "none" if state.is_success() else ""
        table.append((str(index), member_uuid, state.task_name or "-", state.state, _cut(outcome)))
    echo_table(("#", "UUID", "TASK", "STATE", "RESULT OR ERROR"), table)
    if note:
        click.echo(f"{_plural(len(members), 'member')}{note}")


@main.command(epilog="\b\nExamples:\n  machinery pending\n  machinery pending emails --limit 10")
@server_options
@click.argument("queue", required=False)
@_LIMIT
@click.pass_context
def pending(ctx: click.Context, queue: str | None, limit: int) -> None:
    """List the tasks waiting in a queue.

    QUEUE defaults to the config's default_queue. Messages that are not valid task
    messages are not listed (a worker moves them to the dead letters).
    """
    server = get_server(ctx)
    name = queue or server.config.default_queue
    tasks = server.broker.get_pending_tasks(name)
    shown, note = _limited(tasks, limit)
    if shown:
        echo_table(("UUID", "TASK", "ARGS"), [(s.uuid, s.name, _cut(format_args(s.args))) for s in shown])
    click.echo(f"{_plural(len(tasks), 'task')} pending in {name}{note}")


@main.command(epilog="\b\nExample:\n  machinery delayed")
@server_options
@_LIMIT
@click.pass_context
def delayed(ctx: click.Context, limit: int) -> None:
    """List the tasks waiting for their ETA, soonest first."""
    server = get_server(ctx)
    tasks = server.broker.get_delayed_tasks()
    shown, note = _limited(tasks, limit)
    if shown:
        echo_table(
            ("UUID", "TASK", "ARGS", "QUEUE", "ETA"),
            [
                (s.uuid, s.name, _cut(format_args(s.args)), s.routing_key, f"{format_time(s.eta)} ({_relative(s.eta)})")
                for s in shown
            ],
        )
    click.echo(f"{_plural(len(tasks), 'task')} delayed{note}")


@main.command(epilog="\b\nExamples:\n  machinery dead\n  machinery dead emails")
@server_options
@click.argument("queue", required=False)
@_LIMIT
@click.pass_context
def dead(ctx: click.Context, queue: str | None, limit: int) -> None:
    """List a queue's dead letters, and why each failed.

    Dead letters are messages a worker could not process (not JSON, not a task message).
    QUEUE defaults to the config's default_queue.
    """
    server = get_server(ctx)
    name = queue or server.config.default_queue
    letters = server.broker.dead_letters(name)
    shown, note = _limited(letters, limit)
    if shown:
        echo_table(
            ("TIME", "REASON", "MESSAGE"),
            [(format_time(d.time), _cut(d.reason, 50), _describe_body(d.body)) for d in shown],
        )
    click.echo(f"{_plural(len(letters), 'dead letter')} in {name}{note}")
    if letters:
        click.echo(f"Put them back on the queue with: machinery requeue-dead {name}")


def _describe_body(body: bytes) -> str:
    try:
        signature = Signature.decode(body)
    except MachineryError:
        return _cut(body.decode("utf-8", "backslashreplace"))
    return _cut(f"{signature.uuid} {signature.name}({format_args(signature.args)})")


@main.command("requeue-dead", epilog="\b\nExamples:\n  machinery requeue-dead\n  machinery requeue-dead emails")
@server_options
@click.argument("queue", required=False)
@click.pass_context
def requeue_dead(ctx: click.Context, queue: str | None) -> None:
    """Put a queue's dead letters back on the queue."""
    server = get_server(ctx)
    name = queue or server.config.default_queue
    count = server.broker.requeue_dead(name)
    click.echo(f"Requeued {_plural(count, 'dead letter')} to {name}")


_PERIODIC_EPILOG = """\b
Examples:
  machinery periodic -A myapp.tasks:server
  machinery periodic -A myapp.tasks:server --list
  machinery periodic -A myapp.tasks:server --loglevel debug

Runs the periodic tasks and workflows the app registers (server.register_periodic_task,
_chain, _group, _chord), and no worker. Workers run them too unless started with
--no-periodic; however many processes run an entry, each tick fires once (through the
config's lock). SIGINT or SIGTERM stops it."""


@main.command(epilog=_PERIODIC_EPILOG)
@server_options
@click.option("--list", "list_only", is_flag=True, help="List the app's periodic entries and exit.")
@click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
    help="Log level (the log goes to stderr).",
)
@click.pass_context
def periodic(ctx: click.Context, list_only: bool, loglevel: str) -> None:
    """Fire the app's periodic tasks and workflows (no worker)."""
    if not list_only:
        setup_logging(loglevel)
    server = get_server(ctx, need_app=True)
    app = ctx.ensure_object(_State).app
    entries = server.periodic_entries()
    if list_only:
        if entries:
            echo_entries(entries)
        click.echo(f"{_entries(len(entries))} registered by {app}")
        return
    if not entries:
        raise CliError(
            f"{app} registers no periodic tasks or workflows: nothing to run; register them with "
            "server.register_periodic_task(spec, name, signature) and its _chain, _group, _chord twins"
        )
    echo_entries(entries)
    key = server.periodic.lock_key(entries[0])
    program = key[len(LOCK_PREFIX) : len(key) - len(entries[0].name) - len(entries[0].spec)]
    click.echo(f"Running {_entries(len(entries))}; SIGINT or SIGTERM stops.")
    click.echo(
        f"Each tick fires once across the schedulers sharing the lock {safe_url(server.config.lock_url)} "
        f"as program {program!r} (Config.periodic_lock_program)."
    )
    with contextlib.suppress(KeyboardInterrupt):  # no signal handlers when the config says no_unix_signals
        server.run_periodic()
    click.echo("Periodic scheduler stopped.")


def _entries(count: int) -> str:
    return f"{count} periodic {'entry' if count == 1 else 'entries'}"


def echo_entries(entries: Sequence[PeriodicEntry]) -> None:
    """A table of periodic entries: name, kind, spec, next run, and what each tick sends."""
    now = datetime.now(timezone.utc)
    rows = []
    for entry in entries:
        upcoming = entry.next_run
        if upcoming is not None and upcoming <= now:  # the scheduler moves it on when it runs
            upcoming = entry.schedule.next(now)
        when = f"{format_time(upcoming)} ({_relative(upcoming)})" if upcoming is not None else "never"
        rows.append((entry.name, entry.kind, entry.spec, when, _cut(describe_entry(entry))))
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


_DEMO_EPILOG = """\b
Examples:
  machinery demo
  machinery demo --broker redis://localhost:6379/0"""


@main.command(epilog=_DEMO_EPILOG)
@click.option(
    "--broker", metavar="URL", help="Broker and backend URL  [default: a SQLite file in a temporary directory]"
)
@click.option("-v", "--verbose", is_flag=True, help="Also show the worker's log on stderr.")
def demo(broker: str | None, verbose: bool) -> None:
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
        ok = run_demo(broker, verbose=verbose)
    except Exception as exc:
        if broker is not None and is_connection_error(exc):
            raise CliError(unreachable_message(broker, broker, exc)) from None
        raise
    if not ok:
        raise CliError("the demo did not get the results it expected (see above)")


if __name__ == "__main__":  # pragma: no cover
    main()
