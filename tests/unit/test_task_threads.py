"""The threads ``def`` tasks run on: results, errors and cancellation come back to the loop,
and calls that finish while the loop is busy come back together (one wake-up of the loop).

Waits are bounded only so that a broken hand-over fails a test instead of hanging it.
"""

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from machinery.worker import TaskThreads


@pytest.fixture
def threads() -> Iterator[TaskThreads]:
    pool = TaskThreads(8, thread_name_prefix="test-task")
    yield pool
    pool.shutdown(wait=True)


def test_results_and_errors_come_back_to_the_loop(threads: TaskThreads) -> None:
    def fail() -> None:
        raise ValueError("from the thread")

    async def main() -> None:
        assert await asyncio.wait_for(threads.run(lambda: 42), 30) == 42
        with pytest.raises(ValueError, match="from the thread"):
            await asyncio.wait_for(threads.run(fail), 30)
        assert threads.busy == 0

    asyncio.run(main())


def test_calls_finished_while_the_loop_is_busy_are_handed_over_in_one_wake_up(threads: TaskThreads) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counting(*args: Any) -> asyncio.Handle:
            nonlocal wake_ups
            wake_ups += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        waiters = [threads.run(lambda value=value: value) for value in range(8)]  # type: ignore[misc]
        # Keep the loop busy (blocked, not awaiting) until every call is queued for hand-over.
        deadline = time.monotonic() + 30
        while sum(len(batch) for batch in threads._finished.values()) < 8 and time.monotonic() < deadline:
            time.sleep(0.001)  # noqa: ASYNC251  (blocking the loop is the point)
        results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert wake_ups == 1
        return list(results)

    assert asyncio.run(main()) == list(range(8))


def test_cancelling_a_call_that_has_not_started_keeps_it_from_running(threads: TaskThreads) -> None:
    release = threading.Event()
    ran: list[int] = []

    def hold() -> None:
        release.wait(30)

    async def main() -> None:
        holding = [threads.run(hold) for _ in range(8)]  # every thread busy
        queued = threads.run(lambda: ran.append(1))
        queued.cancel()
        await asyncio.sleep(0)  # the cancel reaches the call on the loop's next turn, as with run_in_executor
        release.set()
        await asyncio.wait_for(asyncio.gather(*holding), 30)
        with pytest.raises(asyncio.CancelledError):
            await queued

    asyncio.run(main())
    threads.shutdown(wait=True)
    assert ran == []


def test_a_call_finishing_after_its_loop_closed_is_dropped_quietly(threads: TaskThreads) -> None:
    release = threading.Event()

    async def start() -> None:
        threads.run(lambda: release.wait(30))

    asyncio.run(start())  # the loop closes with the call still running
    release.set()
    threads.shutdown(wait=True)  # raises nothing on the thread, leaves no loop behind
    assert threads.busy == 0
