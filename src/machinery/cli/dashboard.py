"""``machinery dashboard``: the web dashboard (``machinery.dashboard``) served with uvicorn."""

from __future__ import annotations

import ipaddress

import click

from ..errors import MissingExtra
from .app import BadArgument, CliError, get_server, server_options

_EPILOG = """\b
Examples:
  machinery dashboard -A myapp.tasks:server
  machinery dashboard --port 9000 -Q emails -Q reports
  machinery dashboard --host 0.0.0.0 --token "$(openssl rand -hex 16)"

Bound to 127.0.0.1 unless --host is given; bound elsewhere it needs --token, and the
dashboard's URL then carries it once (?token=...), which leaves a cookie."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(epilog=_EPILOG)
@server_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True, help="Port.")
@click.option("--token", envvar="MACHINERY_DASHBOARD_TOKEN", help="Require this token (needed off loopback).")
@click.option("-Q", "--queue", "queues", multiple=True, metavar="QUEUE", help="Also show this queue (repeatable).")
@click.pass_context
def dashboard(ctx: click.Context, host: str, port: int, token: str | None, queues: tuple[str, ...]) -> None:
    """Serve the web dashboard of queues, workers and tasks.

    It also shows each task's page (/tasks/UUID), a group's members and why its chord has not
    fired, and the app's periodic entries; it updates every 2 seconds."""
    if not _loopback(host) and not token:
        raise BadArgument(f"--host {host} is reachable from other machines: give --token too")
    try:
        import uvicorn

        from ..dashboard import create_app
    except (ImportError, MissingExtra) as exc:
        raise CliError(f"the dashboard needs its extra: pip install 'machinery[dashboard]' ({exc})") from None
    server = get_server(ctx, read_only=True)
    app = create_app(server, token=token, queues=queues)
    click.echo(f"Dashboard on http://{host}:{port}/ (Ctrl-C stops it)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
