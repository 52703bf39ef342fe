"""What every side of the comparison shares (stdlib and redis-py only: it runs in the peers'
virtualenv too): the tasks' first-execution mark, waiting for a count, percentiles, peak RSS."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

FIRST_KEY = "bench:compare:first"  # a hash: worker pid -> time of its first task execution
_first: float | None = None
_client: redis.Redis | None = None


def mark_first(redis_url: str) -> None:
    """Called by every benchmark task: the first call in a process stores when it ran (one
    write per process, so the tasks themselves cost nothing extra after that)."""
    global _first, _client
    if _first is None:
        _first = time.time()
        _client = redis.Redis.from_url(redis_url)
        _client.hset(FIRST_KEY, str(os.getpid()), repr(_first))


def reset_first(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).delete(FIRST_KEY)


def first_execution(redis_url: str) -> float:
    marks = redis.Redis.from_url(redis_url).hvals(FIRST_KEY)
    if not marks:
        raise SystemExit("no task ran")
    return min(float(mark) for mark in marks)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.001) -> float:
    """Poll ``predicate`` until true; returns time.time() when it was first seen true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(poll)
    return time.time()


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` and of its children (a worker that forks its workers counts them all)."""
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for one in pids:
        for line in Path(f"/proc/{one}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def report(**figures: Any) -> None:
    """The one JSON line a side prints for the orchestrator."""
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
