"""machinery's side of the comparison (run by compare.py with the project's Python).

    python side_machinery.py MEASURE --broker URL --queue NAME [options]

MEASURE is enqueue, process, latency, sleep or worker (a worker process, started by the others).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).parent))
from _measure import first_execution, mark_first, peak_rss_mb, percentile, report, reset_first, wait_for

from machinery import Config, RedisConfig, Server, Signature

MARK_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")


def make_server(args: argparse.Namespace) -> Server:
    config = Config(
        broker=args.broker,
        result_backend=args.backend,
        default_queue=args.queue,
        results_expire_in=600,
        redis=RedisConfig(delayed_tasks_key=f"{args.queue}_delayed"),
    )
    server = Server(config)

    @server.task(name="work")
    def work(value: int) -> int:
        mark_first(MARK_URL)
        return value

    @server.task(name="nap")
    async def nap() -> int:
        mark_first(MARK_URL)
        await asyncio.sleep(0.05)
        return 1

    return server


def start_workers(args: argparse.Namespace, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, __file__, "worker", "--broker", args.broker, "--queue", args.queue]
    command += ["--backend", args.backend, "--concurrency", str(concurrency)]
    return [
        subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(count)
    ]  # never holding the report's pipe


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> list[float]:
    rss = [peak_rss_mb(worker.pid) for worker in workers]
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(60)
    return rss


def drained(args: argparse.Namespace, count: int):  # type: ignore[no-untyped-def]
    """A predicate: every task taken and its final state stored (a message is acked only then)."""
    if args.broker.startswith("redis"):
        # The measured version's own key names (they gained a hash tag since 82219a6), found
        # through the consumers' heartbeats: a SCAN of a busy server's keyspace every
        # millisecond would take Redis's time from the workers under measure.
        from machinery.brokers.redis import heartbeats_key, processing_prefix

        client = redis.Redis.from_url(args.broker)
        heartbeats, prefix = heartbeats_key(args.queue), processing_prefix(args.queue)

        def redis_drained() -> bool:
            consumers = client.zrange(heartbeats, 0, -1)
            pipe = client.pipeline(transaction=False)
            pipe.llen(args.queue)
            for consumer in consumers:
                pipe.llen(prefix + consumer.decode())
            return not any(pipe.execute())

        return redis_drained
    path = args.broker.removeprefix("sqlite:///")
    db = sqlite3.connect(path, timeout=30)

    def sqlite_drained() -> bool:
        (done,) = db.execute("SELECT COUNT(*) FROM task_states WHERE state = 'SUCCESS'").fetchone()
        return int(done) >= count

    return sqlite_drained


def enqueue(args: argparse.Namespace) -> None:
    server = make_server(args)
    for _ in range(20):  # connections and code paths warm
        server.send_task(Signature("work", [1]))
    started = time.perf_counter()
    for i in range(args.tasks):
        server.send_task(Signature("work", [i]))
    elapsed = time.perf_counter() - started
    report(enqueue_per_s=args.tasks / elapsed)


def preload(server: Server, name: str, count: int) -> None:
    async def send() -> None:
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(
                    server.asend_task(Signature(name, [1] if name == "work" else []))
                    for _ in range(min(1000, count - start))
                )
            )

    asyncio.run(send())


def process(args: argparse.Namespace, name: str = "work") -> None:
    server = make_server(args)
    preload(server, name, args.tasks)
    reset_first(MARK_URL)
    workers = start_workers(args, args.processes, args.concurrency)
    done = wait_for(drained(args, args.tasks), 300, "the tasks to finish")
    rss = stop_workers(workers)
    elapsed = done - first_execution(MARK_URL)
    if name == "work":
        report(processing_per_s=args.tasks / elapsed, rss_mb=max(rss), seconds=elapsed)
    else:
        report(sleep_s=elapsed, rss_mb=max(rss))


def latency(args: argparse.Namespace) -> None:
    server = make_server(args)
    workers = start_workers(args, 1, args.concurrency)
    try:
        for i in range(20):
            server.send_task(Signature("work", [i])).get(timeout=30)
        samples = []
        for i in range(args.tasks):
            started = time.perf_counter()
            assert server.send_task(Signature("work", [i])).get(timeout=30) == i
            samples.append(time.perf_counter() - started)
    finally:
        stop_workers(workers)
    report(p50_ms=percentile(samples, 0.5) * 1000, p99_ms=percentile(samples, 0.99) * 1000)


def worker(args: argparse.Namespace) -> None:
    make_server(args).new_worker("bench", args.concurrency, periodic=False).launch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=["enqueue", "process", "latency", "sleep", "worker"])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--backend", default="")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if args.measure == "sleep":
        process(args, "nap")
    else:
        {"enqueue": enqueue, "process": process, "latency": latency, "worker": worker}[args.measure](args)


if __name__ == "__main__":
    main()
