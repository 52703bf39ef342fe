"""A worker running beside the test, on its own thread and event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from machinery import Server, Worker

from .waiting import WAIT


@contextmanager
def running_worker(server: Server, **kwargs: Any) -> Iterator[Worker]:
    """Run ``server.new_worker(**kwargs)`` for the duration of the block; on leaving, quit it
    (gracefully: running tasks finish) and re-raise anything the worker raised."""
    worker = server.new_worker(**kwargs)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(worker.arun())
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    if not worker.started.wait(WAIT):
        raise RuntimeError(f"worker did not start within {WAIT} s: {errors}")
    try:
        yield worker
    finally:
        worker.quit()
        thread.join(WAIT)
        assert not thread.is_alive(), f"worker did not stop within {WAIT} s"
        if errors:
            raise errors[0]
