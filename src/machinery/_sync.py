"""The sync face: run the async implementation to completion from plain code.

Where the drivers allow it (``idle_loop_ok``: Redis, SQLite, memory), a sync call from a thread
with no running loop (a script, Django, Flask, a thread pool) runs on an event loop of that
thread's own, kept for its later calls: no hop to another thread and back, which costs more
than a Redis round trip. Every other sync call, and any from a thread whose loop is running
(async code calling the sync face, which must not block that loop), runs on one private
background loop in a daemon thread (the portal), which never touches the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_local = threading.local()


_inherited: list[object] = []


def _forget_loops_after_fork() -> None:
    # The portal's thread does not exist in a forked child (gunicorn --preload, multiprocessing),
    # and the calling thread's loop holds the parent's connections: start afresh there. The
    # parent's loops are kept, never closed: a closed loop would deregister its descriptors from
    # the epoll instance it shares with the parent, and the parent's loop would never wake again.
    global _lock, _loop, _thread, _local
    _inherited.append((_loop, getattr(_local, "loop", None)))
    _lock, _loop, _thread, _local = threading.Lock(), None, None, threading.local()


os.register_at_fork(after_in_child=_forget_loops_after_fork)


def _portal() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="machinery-sync", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def _thread_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = _local.loop = asyncio.new_event_loop()
    return loop


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None, *, here: bool = False) -> T:
    """Run ``coro`` to completion and return its result.

    With ``here``, on this thread's own loop (unless this thread is running a loop already):
    for drivers whose connections need nothing from their loop between calls, since that loop
    sleeps until the next call. Otherwise on the background loop, which always runs (RabbitMQ
    heartbeats and reconnections happen there while the application does something else).
    """
    if here:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _run_here(coro, timeout)
    return _run_on_portal(coro, timeout)


def _run_here(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
    loop = _thread_loop()
    task = loop.create_task(coro if timeout is None else asyncio.wait_for(coro, timeout))
    try:
        return loop.run_until_complete(task)
    except BaseException:
        # Interrupted (Ctrl-C) while the task is still on its way: cancel it now, so that it
        # does not resume in this thread's next call.
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        raise


def _run_on_portal(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
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
