"""Tasks, a worker entry point and the helpers shared by the benchmark scripts.

Run a worker: ``python benchmarks/bench_tasks.py QUEUE CONCURRENCY`` (broker from $BROKER).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machinery import Config, RedisConfig, Server, Signature

HERE = Path(__file__).resolve()


async def noop() -> None:
    return None


async def echo(value: int) -> int:
    return value


async def sleep_50ms() -> None:
    await asyncio.sleep(0.05)


TASKS: dict[str, Callable[..., Any]] = {"noop": noop, "echo": echo, "sleep_50ms": sleep_50ms}


def make_server(queue: str) -> Server:
    broker = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
    backend = os.environ.get("RESULT_BACKEND", broker)
    config = Config(
        broker=broker,
        result_backend=backend,
        default_queue=queue,
        redis=RedisConfig(delayed_tasks_key=f"{queue}_delayed"),
    )
    server = Server(config)
    server.register_tasks(TASKS)
    return server


def start_worker(*args: str, script: Path = HERE) -> subprocess.Popen[bytes]:
    """A worker in its own process: ``script`` (by default this file's) run with ``args``."""
    return subprocess.Popen([sys.executable, str(script), *args])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(worker: subprocess.Popen[bytes]) -> float:
    """Stop ``worker``; returns its peak RSS in MB."""
    rss = peak_rss_mb(worker.pid)
    worker.terminate()
    worker.wait(30)
    return rss


async def round_trips(server: Server, count: int, timeout: float) -> list[float]:
    """Seconds each of ``count`` sequential ``echo`` round trips took, after 50 to warm up."""
    samples = []
    for i in range(count + 50):
        started = time.perf_counter()
        result = await server.asend_task(Signature("echo", [i]))
        assert await result.aget(timeout=timeout) == i
        if i >= 50:  # the first round trips warm connections and code paths
            samples.append(time.perf_counter() - started)
    return samples


def latency_line(samples: list[float]) -> str:
    """The ``latency`` line of a report: percentiles and mean of ``samples`` (in seconds)."""
    samples = sorted(samples)

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p * len(samples)))] * 1000

    return (
        f"latency  p50 {pct(0.50):.3f} ms   p95 {pct(0.95):.3f} ms   p99 {pct(0.99):.3f} ms   "
        f"(mean {statistics.mean(samples) * 1000:.3f} ms, {len(samples)} sequential round trips)"
    )


if __name__ == "__main__":
    queue_name, concurrency = sys.argv[1], int(sys.argv[2])
    make_server(queue_name).new_worker("bench", concurrency).launch()
