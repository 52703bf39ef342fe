"""Finding the app's Server for a command, and turning the errors commands meet into one line.

Every command finds its Server the same way: ``-A module:attr`` names one in your code,
``--config FILE.yml`` reads a Go Machinery YAML file, and otherwise the environment is read
(``BROKER``, ``RESULT_BACKEND``, ...), falling back to the embedded SQLite file.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .._drivers.sqlite import MEMORY, parse_sqlite_url
from .._sync import run_sync
from ..config import Config
from ..config import redact_url as safe_url
from ..errors import BrokerConnectionError, ConfigError, MachineryError, UnsupportedOperation
from ..factory import scheme_of
from ..server import Server
from ..state import TaskState
from .formatting import one_line

F = TypeVar("F", bound=Callable[..., Any])

STATES_PER_READ = 5000
"""States read per round trip when a command reads many (a group's members)."""


# --------------------------------------------------------------------------- errors


class CliError(click.ClickException):
    """A one-line error shown as ``Error: message``, exit code 1."""


class BadArgument(CliError):
    """An argument or option the command cannot use; exit code 2, like click's usage errors."""

    exit_code = 2


class WaitTimeout(CliError):
    """``send --wait`` gave up before the task finished; exit code 2."""

    exit_code = 2


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


class OneLineErrorGroup(click.Group):
    """Turns the errors every command can meet into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if is_connection_error(exc):
                raise CliError(_unreachable(ctx, exc)) from None
            if isinstance(exc, UnsupportedOperation):
                raise CliError(f"not available on this broker: {one_line(exc)}") from None
            if isinstance(exc, MachineryError):
                raise CliError(one_line(exc)) from None
            raise


def _unreachable(ctx: click.Context, exc: BaseException) -> str:
    state = ctx.find_object(CliState)
    if state is None or state.server is None:
        return unreachable_message(None, None, exc)
    return unreachable_message(state.server.config.broker, state.server.config.result_backend_url, exc)


def unreachable_message(broker: str | None, backend: str | None, exc: BaseException) -> str:
    """One line saying which URL could not be reached, why, and what to check."""
    detail = (one_line(exc) or type(exc).__name__).rstrip(".")
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
class CliState:
    """What ``-A/--app`` and ``--config`` chose, and the Server made from them (once per command line)."""

    app: str | None = None
    config: str | None = None
    server: Server | None = None


def _remember(field: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            setattr(ctx.ensure_object(CliState), field, value)

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


def app_spec(ctx: click.Context) -> str | None:
    """The ``-A`` given on the command line, if any."""
    return ctx.ensure_object(CliState).app


def get_server(ctx: click.Context, need_app: bool = False, read_only: bool = False) -> Server:
    """The Server named by -A, or one built from --config or the environment (made once).

    ``read_only`` commands (status, pending, delayed, dead) never create a SQLite file: one
    that does not exist yet is an error saying that nothing has been sent there.
    """
    state = ctx.ensure_object(CliState)
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
            message = one_line(exc)
            if not state.config:
                message += " (from the environment)"
            elif state.config not in message:
                message += f" (from --config {state.config})"
            raise CliError(message) from None
    ctx.call_on_close(_closer(state.server))
    if read_only:
        _require_existing_files(state.server)
    return state.server


def _require_existing_files(server: Server) -> None:
    config = server.config
    for url in (config.broker, config.result_backend_url):
        if scheme_of(url) != "sqlite":
            continue
        path, _ = parse_sqlite_url(url)
        if path != MEMORY and not os.path.exists(path):
            raise CliError(
                f"no SQLite database at {path}: nothing has been sent there yet (with no -A, --config or "
                "BROKER, machinery uses machinery.db in the current directory)"
            )


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
        raise CliError(f"{one_line(exc)} (while importing {module_name!r})") from None
    except Exception as exc:
        raise CliError(f"cannot import {module_name!r}: {type(exc).__name__}: {one_line(exc)}{_where(exc)}") from None

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


# --------------------------------------------------------------------------- reading from the Server


def read_states(server: Server, task_uuids: Sequence[str]) -> list[TaskState | None]:
    """The stored state of each task, in order, read ``STATES_PER_READ`` at a time."""
    states: list[TaskState | None] = []
    for start in range(0, len(task_uuids), STATES_PER_READ):
        states += run_sync(server.backend.get_states(task_uuids[start : start + STATES_PER_READ]))
    return states
