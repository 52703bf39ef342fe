"""The sync face: run the async implementation on one background event loop.

Sync calls (from Django, Flask, scripts or a thread beside a running loop) are executed on a
private loop in a daemon thread, so they never touch, block or deadlock a caller's own loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _forget_portal_after_fork() -> None:
    # The loop's thread does not exist in a forked child (gunicorn --preload, multiprocessing):
    # start afresh there, or every sync call would wait forever for a thread that is gone.
    global _lock, _loop, _thread
    _lock, _loop, _thread = threading.Lock(), None, None


os.register_at_fork(after_in_child=_forget_portal_after_fork)


def _portal() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="machinery-sync", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` to completion on the background loop and return its result."""
    loop = _portal()
    if threading.current_thread() is _thread:
        coro.close()  # never awaited: close it so no "never awaited" warning follows the error
        raise RuntimeError(
            "a sync machinery call was made from inside machinery's own loop (e.g. from a pre-publish "
            "handler); it would wait for itself forever — use the async face there"
        )
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise
