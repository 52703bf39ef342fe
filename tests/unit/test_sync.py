"""The sync face works where applications call it: no loop, another thread's loop, a fork."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading

from machinery import Config, Server, Signature
from machinery._sync import run_sync


async def _double(value: int) -> int:
    await asyncio.sleep(0)
    return value * 2


def test_sync_call_from_a_plain_thread_while_a_loop_runs_elsewhere() -> None:
    results: list[int] = []

    async def main() -> None:
        # A sync call made from a worker thread of a running loop must not deadlock it.
        results.append(await asyncio.get_running_loop().run_in_executor(None, run_sync, _double(4)))

    asyncio.run(main())
    assert results == [8]


def _send_in_child(url: str, queue: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    server = Server(Config(broker=url, default_queue=queue))
    out.put(server.send_task(Signature("add", [1])).task_uuid)


def test_sync_calls_work_in_a_forked_child() -> None:
    run_sync(_double(1))  # the parent's background loop exists before the fork
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_send_in_child, args=("memory://fork", "fork_q", out))
    child.start()
    child.join(20)
    assert child.exitcode == 0, "the sync face hung or failed in the forked child"
    assert out.get(timeout=1).startswith("task_")
    assert threading.active_count() >= 1
