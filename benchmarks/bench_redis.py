"""Throughput, latency and memory of machinery on Redis.

    python benchmarks/bench_redis.py [--tasks 20000] [--latency-tasks 1000]

Measures, each against a fresh queue and a worker in its own process:
  enqueue   20,000 no-op tasks sent with asend_task (PENDING write + publish each),
            100 sends in flight
  drain     the same 20,000 drained by one worker process (concurrency 100), from the
            worker's first heartbeat until the queue and its processing list are empty
  latency   1,000 sequential round trips (send, then wait for the result), p50/p95/p99
  sleep     2,000 tasks of ``await asyncio.sleep(0.05)`` at concurrency 100 vs the ideal
            (2,000 / 100 x 50 ms = 1.0 s)
  rss       the worker process's peak resident memory (VmHWM)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))
from bench_tasks import latency_line, make_server, round_trips, start_worker, stop

from machinery import Server, Signature
from machinery.brokers.redis import heartbeats_key, processing_prefix


def check_alive(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        raise SystemExit(f"the benchmark worker exited with code {worker.returncode}")


async def wait_for_worker(client: aioredis.Redis, queue: str, worker: subprocess.Popen[bytes]) -> float:
    while not await client.zcard(heartbeats_key(queue)):
        check_alive(worker)
        await asyncio.sleep(0.001)
    return time.perf_counter()


async def wait_drained(client: aioredis.Redis, queue: str, worker: subprocess.Popen[bytes]) -> float:
    while True:
        check_alive(worker)
        consumers = await client.zrange(heartbeats_key(queue), 0, -1)
        async with client.pipeline(transaction=False) as pipe:
            pipe.llen(queue)
            for consumer in consumers:
                pipe.llen(processing_prefix(queue) + consumer.decode())
            lengths = await pipe.execute()
        if not any(lengths):
            return time.perf_counter()
        await asyncio.sleep(0.002)


async def enqueue(server_queue: str, name: str, count: int, in_flight: int = 100) -> float:
    return await enqueue_with(make_server(server_queue), name, count, in_flight)


async def enqueue_with(server: Server, name: str, count: int, in_flight: int = 100) -> float:
    """Seconds ``server`` takes to send ``count`` tasks ``name``, ``in_flight`` at a time (it is closed after)."""
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(in_flight)

    async def send() -> None:
        async with semaphore:
            await server.asend_task(Signature(name))

    await asyncio.gather(*(send() for _ in range(count)))
    elapsed = time.perf_counter() - started
    await server.aclose()
    return elapsed


async def drain(client: aioredis.Redis, queue: str, concurrency: int) -> tuple[float, subprocess.Popen[bytes]]:
    worker = start_worker(queue, str(concurrency))
    started = await wait_for_worker(client, queue, worker)
    finished = await wait_drained(client, queue, worker)
    return finished - started, worker


async def latency(queue: str, count: int) -> list[float]:
    server = make_server(queue)
    samples = await round_trips(server, count, timeout=10)
    await server.aclose()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency-tasks", type=int, default=1_000)
    parser.add_argument("--sleep-tasks", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    broker = os.environ.get("BROKER", "redis://127.0.0.1:6379/0")
    client = aioredis.Redis.from_url(broker)
    run = uuid.uuid4().hex[:8]

    queue = f"bench_noop_{run}"
    enqueue_s = await enqueue(queue, "noop", args.tasks)
    drain_s, worker = await drain(client, queue, args.concurrency)
    rss = stop(worker)
    print(f"enqueue  {args.tasks / enqueue_s:10,.0f} tasks/s   ({args.tasks} in {enqueue_s:.2f} s)")
    print(f"drain    {args.tasks / drain_s:10,.0f} tasks/s   ({args.tasks} in {drain_s:.2f} s, 1 worker process)")

    queue = f"bench_latency_{run}"
    worker = start_worker(queue, "1")
    await wait_for_worker(client, queue, worker)
    samples = await latency(queue, args.latency_tasks)
    stop(worker)
    print(latency_line(samples))

    queue = f"bench_sleep_{run}"
    await enqueue(queue, "sleep_50ms", args.sleep_tasks)
    sleep_s, worker = await drain(client, queue, args.concurrency)
    stop(worker)
    ideal = args.sleep_tasks / args.concurrency * 0.05
    print(
        f"sleep    {sleep_s:.3f} s for {args.sleep_tasks} x 50 ms at concurrency {args.concurrency}: "
        f"{sleep_s / ideal:.3f} x ideal ({ideal:.2f} s)"
    )
    print(f"rss      {rss:.1f} MB peak worker RSS (drain run)")
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
