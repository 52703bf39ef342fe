"""The sync face: run the async implementation on one background event loop.

Sync calls (from Django, Flask, scripts or a thread beside a running loop) are executed on a
private loop in a daemon thread, so they never touch, block or deadlock a caller's own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


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
