"""Throughput and latency of machinery on RabbitMQ (AMQP broker, Redis result backend by default).

    python benchmarks/bench_amqp.py [--tasks 20000] [--latency-tasks 1000] [--concurrency 100]
                                    [--skip-publisher-queue] [--result-backend URL]

Measures, each against a fresh exchange and queue and a worker in its own process:
  enqueue   N no-op tasks sent with asend_task (PENDING write + confirmed publish each),
            100 sends in flight
  drain     the same N drained by one worker process (prefetch = concurrency), from the
            moment RabbitMQ shows its consumer until every task's SUCCESS is stored
  latency   sequential round trips (send, then wait for the result) against a worker of
            concurrency 1, p50/p95/p99
  rss       the worker process's peak resident memory (VmHWM)

The broker comes from $BROKER (default amqp://guest:guest@127.0.0.1:5672/), the result
backend from --result-backend or $RESULT_BACKEND (default redis://127.0.0.1:6379/0). By
default the topology is Go's, publisher-side queue included (every task is also copied into
a queue named after the binding key); --skip-publisher-queue measures the Python-only mode.
Everything the run declared is deleted at the end.
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

import aio_pika

sys.path.insert(0, str(Path(__file__).parent))
from bench_tasks import TASKS, latency_line, round_trips, start_worker, stop

from machinery import AMQPConfig, Config, Server, Signature

HERE = Path(__file__).resolve()
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/0"


def make_server(prefix: str, backend: str, skip_publisher_queue: bool) -> Server:
    config = Config(
        broker=os.environ.get("BROKER", DEFAULT_BROKER),
        result_backend=backend,
        default_queue=f"{prefix}_q",
        amqp=AMQPConfig(
            exchange=f"{prefix}_ex",
            binding_key=f"{prefix}_key",
            prefetch_count=0,  # prefetch = the worker's concurrency
            skip_publisher_queue=skip_publisher_queue,
        ),
    )
    server = Server(config)
    server.register_tasks(TASKS)
    return server


def start_amqp_worker(prefix: str, backend: str, concurrency: int, skip: bool) -> subprocess.Popen[bytes]:
    flags = ["--skip-publisher-queue"] if skip else []
    return start_worker("--worker", prefix, backend, str(concurrency), *flags, script=HERE)


async def queue_stats(channel: aio_pika.abc.AbstractChannel, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``."""
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def wait_for_consumer(channel: aio_pika.abc.AbstractChannel, queue: str) -> float:
    while True:
        if (await queue_stats(channel, queue))[1]:
            return time.perf_counter()
        await asyncio.sleep(0.001)


async def declare_worker_queue(server: Server) -> None:
    consumer = await server.broker.open_consumer(server.config.default_queue, "bench-setup", prefetch=1)
    await consumer.close()


async def enqueue(server: Server, count: int, in_flight: int = 100) -> tuple[float, list[str]]:
    semaphore = asyncio.Semaphore(in_flight)
    uuids: list[str] = []

    async def send() -> None:
        async with semaphore:
            uuids.append((await server.asend_task(Signature("noop"))).task_uuid)

    started = time.perf_counter()
    await asyncio.gather(*(send() for _ in range(count)))
    return time.perf_counter() - started, uuids


async def wait_all_succeeded(
    server: Server, uuids: list[str], channel: aio_pika.abc.AbstractChannel | None = None
) -> float:
    """Poll the backend until every task's SUCCESS is stored; returns when that was seen.

    With ``channel``, first wait (cheaply) for the queue to be empty, so that reading
    thousands of states does not take CPU from the worker while it drains.
    """
    while channel is not None:
        if not (await queue_stats(channel, server.config.default_queue))[0]:
            break
        await asyncio.sleep(0.01)
    pending = list(uuids)
    while pending:
        left = []
        for start in range(0, len(pending), 5000):
            batch = pending[start : start + 5000]
            states = await server.backend.get_states(batch)
            left.extend(u for u, s in zip(batch, states, strict=True) if s is None or s.state != "SUCCESS")
        pending = left
        if pending:
            await asyncio.sleep(0.01)
    return time.perf_counter()


async def cleanup(prefix: str) -> None:
    connection = await aio_pika.connect(os.environ.get("BROKER", DEFAULT_BROKER))
    try:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        for name in (f"{prefix}_q", f"{prefix}_key", f"{prefix}_q.dead"):
            await underlay.queue_delete(name)
        await underlay.exchange_delete(f"{prefix}_ex")
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--latency-tasks", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--skip-publisher-queue", action="store_true")
    parser.add_argument("--result-backend", default=os.environ.get("RESULT_BACKEND", DEFAULT_BACKEND))
    args = parser.parse_args()
    backend, skip = args.result_backend, args.skip_publisher_queue
    run = uuid.uuid4().hex[:8]
    mode = "Python-only topology" if skip else "Go topology (publisher-side queue)"
    print(f"AMQP broker {os.environ.get('BROKER', DEFAULT_BROKER)} + backend {backend}, {mode}")

    prefix = f"bench_amqp_{run}"
    server = make_server(prefix, backend, skip)
    connection = await aio_pika.connect(os.environ.get("BROKER", DEFAULT_BROKER))
    try:
        channel = await connection.channel()
        await declare_worker_queue(server)
        enqueue_s, uuids = await enqueue(server, args.tasks)
        worker = start_amqp_worker(prefix, backend, args.concurrency, skip)
        started = await wait_for_consumer(channel, server.config.default_queue)
        finished = await wait_all_succeeded(server, uuids, channel)
        drain_s = finished - started
        rss = stop(worker)
        print(f"enqueue  {args.tasks / enqueue_s:10,.0f} tasks/s   ({args.tasks} in {enqueue_s:.2f} s, 100 in flight)")
        print(
            f"drain    {args.tasks / drain_s:10,.0f} tasks/s   ({args.tasks} in {drain_s:.2f} s, "
            f"1 worker process, concurrency {args.concurrency})"
        )
    finally:
        await server.aclose()
        await cleanup(prefix)

    prefix = f"bench_amqp_latency_{run}"
    server = make_server(prefix, backend, skip)
    try:
        await declare_worker_queue(server)
        worker = start_amqp_worker(prefix, backend, 1, skip)
        await wait_for_consumer(channel, server.config.default_queue)
        samples = await round_trips(server, args.latency_tasks, timeout=30)
        stop(worker)
    finally:
        await server.aclose()
        await cleanup(prefix)
        await connection.close()
    print(latency_line(samples))
    print(f"rss      {rss:.1f} MB peak worker RSS (drain run)")


def worker_main(argv: list[str]) -> None:
    prefix, backend, concurrency = argv[0], argv[1], int(argv[2])
    server = make_server(prefix, backend, "--skip-publisher-queue" in argv)
    server.new_worker("bench", concurrency).launch()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        asyncio.run(main())
