"""The ``machinery`` command line: run a worker, send tasks, inspect queues and states, run the demo.

Every command finds its Server the same way: ``-A module:attr`` names one in your code,
``--config FILE.yml`` reads a Go Machinery YAML file, and otherwise the environment is read
(``BROKER``, ``RESULT_BACKEND``, ...), falling back to the embedded SQLite file. Errors are
one line that says what to do, never a traceback.

The package, by what each part does:

* ``app``: finding the Server (``-A``, ``--config``, the environment) and the one-line errors;
* ``formatting``: arguments, times, states and tables as the commands show them;
* ``running``: ``worker``, ``periodic`` and ``demo``;
* ``sending``: ``send``, with its Go-typed argument parsing and ``--wait``;
* ``inspection``: ``status``, ``pending``, ``delayed``, ``dead`` and ``requeue-dead``;
* ``control``: ``revoke``;
* ``operations``: ``inspect``, ``purge`` and ``ping``;
* ``dashboard``: ``dashboard``, the web view (``machinery.dashboard``).
"""

from __future__ import annotations

import click

from .. import __version__
from .app import (
    BadArgument,
    CliError,
    CliState,
    OneLineErrorGroup,
    WaitTimeout,
    get_server,
    is_connection_error,
    load_app,
    server_options,
    unreachable_message,
)
from .control import revoke
from .dashboard import dashboard
from .formatting import echo_table, format_arg, format_args, format_seconds, format_time, style_state
from .inspection import dead, delayed, pending, requeue_dead, status
from .operations import inspect, ping, purge
from .running import demo, describe_entry, echo_entries, periodic, setup_logging, worker
from .sending import parse_arg, parse_eta, send

__all__ = [
    "main",
    "BadArgument",
    "CliError",
    "WaitTimeout",
    "get_server",
    "is_connection_error",
    "load_app",
    "server_options",
    "unreachable_message",
    "echo_table",
    "format_arg",
    "format_args",
    "format_seconds",
    "format_time",
    "style_state",
    "describe_entry",
    "echo_entries",
    "setup_logging",
    "parse_arg",
    "parse_eta",
]


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.ensure_object(CliState)


for _command in (
    worker,
    periodic,
    demo,
    send,
    status,
    revoke,
    pending,
    delayed,
    dead,
    requeue_dead,
    inspect,
    purge,
    ping,
    dashboard,
):
    main.add_command(_command)
