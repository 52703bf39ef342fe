"""Commands that act on tasks already sent: ``revoke``."""

from __future__ import annotations

import click

from .._sync import run_sync
from .app import get_server, server_options

_REVOKE_EPILOG = """\b
Examples:
  machinery revoke task_0e2d4ac2-7f7e-4b7c-8a8e-3b6c0e1f9a11
  machinery revoke --terminate task_0e2d4ac2-7f7e-4b7c-8a8e-3b6c0e1f9a11 task_9a1c...

A revoked task that no worker has taken yet is FAILURE "revoked" at once, and the worker
that takes it skips it. Without --terminate a task already running finishes; with it, an
async def task is cancelled and a task in a process pool has its process killed (a def task
on a thread cannot be stopped: it runs on, and its outcome is recorded as the FAILURE).
Workers learn of a revocation within a second; it is kept as long as results are."""


@click.command(epilog=_REVOKE_EPILOG)
@server_options
@click.argument("task_uuids", metavar="UUID...", nargs=-1, required=True)
@click.option("--terminate", is_flag=True, help="Also stop the task where it is running.")
@click.pass_context
def revoke(ctx: click.Context, task_uuids: tuple[str, ...], terminate: bool) -> None:
    """Revoke tasks: they do not run, or with --terminate stop where they run."""
    server = get_server(ctx)

    async def revoke_all() -> None:
        for task_uuid in task_uuids:
            await server.arevoke(task_uuid, terminate)

    run_sync(revoke_all())
    for task_uuid in task_uuids:
        click.echo(f"revoked {task_uuid}" + (" (terminate)" if terminate else ""))
