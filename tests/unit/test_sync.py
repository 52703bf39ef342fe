"""The sync face works where applications call it: no loop, another thread's loop, a fork."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import threading
from pathlib import Path

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


async def _thread_ident() -> int:
    return threading.get_ident()


def test_sync_calls_run_on_the_calling_thread_without_a_hop() -> None:
    assert run_sync(_thread_ident(), here=True) == threading.get_ident()
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(run_sync(_thread_ident(), here=True)))
    thread.start()
    thread.join(10)
    assert seen == [thread.ident]


def test_drivers_that_need_a_running_loop_get_the_background_loop() -> None:
    # RabbitMQ's connections answer heartbeats and reconnect between calls: never on a loop
    # that sleeps until the next call.
    assert run_sync(_thread_ident()) != threading.get_ident()
    assert Server(Config(broker="memory://here", result_backend="memory://here"))._sync_here
    assert not Server(Config(broker="amqp://guest:guest@127.0.0.1:5672/", result_backend="null"))._sync_here


def test_sync_call_from_inside_a_running_loop_goes_to_the_background_loop() -> None:
    async def main() -> int:
        return run_sync(_thread_ident(), here=True)  # must not block or re-enter this loop

    assert asyncio.run(main()) != threading.get_ident()


def _send_and_collect_in_child(url: str, queue: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    _send_in_child(url, queue, out)
    gc.collect()  # as any child doing more work would, sooner or later: the parent's loop objects go


def test_a_forked_child_leaves_the_parents_loop_working(tmp_path: Path) -> None:
    run_sync(_double(1), here=True)  # this thread's loop exists before the fork
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_send_and_collect_in_child, args=("memory://fork2", "fork_q", out))
    child.start()
    child.join(20)
    assert child.exitcode == 0
    # SQLite answers from its own thread, which wakes this loop through descriptors the child shared.
    server = Server(Config(broker=f"sqlite:///{tmp_path / 'machinery.db'}", default_queue="fork_q"))
    try:
        sent = server.send_task(Signature("add", [1]))
        assert [s.uuid for s in server.get_pending_tasks()] == [sent.task_uuid]
    finally:
        server.close()
