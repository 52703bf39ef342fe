"""The no-op tasks of ``bench_controls.py``, at module level so that pool children import them."""

from __future__ import annotations

from machinery import TaskContext


async def noop(i: int) -> None:
    return None


def noop_def(i: int) -> None:
    return None


async def noop_progress(ctx: TaskContext, i: int) -> None:
    ctx.progress(0.5, "half way")
