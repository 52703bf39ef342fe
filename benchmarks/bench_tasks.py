"""Tasks and a worker entry point shared by the benchmark scripts.

Run a worker: ``python benchmarks/bench_tasks.py QUEUE CONCURRENCY`` (broker from $BROKER).
"""

from __future__ import annotations

import asyncio
import os
import sys

from machinery import Config, RedisConfig, Server


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

    async def noop() -> None:
        return None

    async def echo(value: int) -> int:
        return value

    async def sleep_50ms() -> None:
        await asyncio.sleep(0.05)

    server.register_tasks({"noop": noop, "echo": echo, "sleep_50ms": sleep_50ms})
    return server


if __name__ == "__main__":
    queue_name, concurrency = sys.argv[1], int(sys.argv[2])
    make_server(queue_name).new_worker("bench", concurrency).launch()
