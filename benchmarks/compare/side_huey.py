"""huey's side of the comparison (run by compare.py with the peers' Python: huey is never a
dependency of machinery). Same measures and the same tasks as side_machinery.py.

    /tmp/peers-venv/bin/python side_huey.py MEASURE --storage redis|sqlite --queue NAME [options]
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import redis
from huey import RedisHuey, SqliteHuey
from huey.consumer import Consumer

sys.path.insert(0, str(Path(__file__).parent))
from _measure import first_execution, mark_first, peak_rss_mb, percentile, report, reset_first, wait_for

MARK_URL = "redis://127.0.0.1:6379/0"


def make_huey(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.storage == "redis":
        # notify_result: a waiting get() is woken by the worker (huey's fastest round trip).
        huey = RedisHuey(args.queue, url=args.redis, notify_result=True)
    else:
        huey = SqliteHuey(args.queue, filename=args.sqlite)

    @huey.task(name="work")
    def work(value: int) -> int:
        mark_first(MARK_URL)
        return value

    @huey.task(name="nap")
    def nap() -> int:
        mark_first(MARK_URL)
        time.sleep(0.05)  # huey runs no coroutines: a sleeping thread is its way
        return 1

    return huey, work, nap


def start_workers(args: argparse.Namespace, workers: int, kind: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "worker", "--storage", args.storage, "--queue", args.queue]
    command += ["--redis", args.redis, "--sqlite", args.sqlite, "--workers", str(workers), "--kind", kind]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)  # never holding the report's pipe


def stop_worker(worker: subprocess.Popen[bytes]) -> float:
    rss = peak_rss_mb(worker.pid)
    worker.send_signal(signal.SIGTERM)  # huey's immediate shutdown (SIGINT waits for its workers)
    worker.wait(60)
    return rss


def results_stored(args: argparse.Namespace, count: int):  # type: ignore[no-untyped-def]
    if args.storage == "redis":
        client = redis.Redis.from_url(args.redis)
        return lambda: client.hlen(f"huey.results.{args.queue}") >= count
    db = sqlite3.connect(args.sqlite, timeout=30)
    return lambda: db.execute("SELECT COUNT(*) FROM kv WHERE queue = ?", (args.queue,)).fetchone()[0] >= count


def enqueue(args: argparse.Namespace) -> None:
    _, work, _ = make_huey(args)
    for _ in range(20):
        work(1)
    started = time.perf_counter()
    for i in range(args.tasks):
        work(i)
    report(enqueue_per_s=args.tasks / (time.perf_counter() - started))


def process(args: argparse.Namespace, sleeping: bool = False) -> None:
    _, work, nap = make_huey(args)
    for i in range(args.tasks):
        if sleeping:
            nap()
        else:
            work(i)
    reset_first(MARK_URL)
    worker = start_workers(args, args.workers, args.kind)
    done = wait_for(results_stored(args, args.tasks), 300, "the tasks to finish")
    rss = stop_worker(worker)
    elapsed = done - first_execution(MARK_URL)
    if sleeping:
        report(sleep_s=elapsed, rss_mb=rss)
    else:
        report(processing_per_s=args.tasks / elapsed, rss_mb=rss, seconds=elapsed)


def latency(args: argparse.Namespace) -> None:
    _, work, _ = make_huey(args)
    worker = start_workers(args, 1, "thread")
    try:
        for i in range(20):
            work(i).get(blocking=True, timeout=30)
        samples = []
        for i in range(args.tasks):
            started = time.perf_counter()
            assert work(i).get(blocking=True, timeout=30) == i
            samples.append(time.perf_counter() - started)
    finally:
        stop_worker(worker)
    report(p50_ms=percentile(samples, 0.5) * 1000, p99_ms=percentile(samples, 0.99) * 1000)


def worker(args: argparse.Namespace) -> None:
    huey, _, _ = make_huey(args)
    # The fastest polling huey allows: an idle worker looks again after 1 ms.
    Consumer(
        huey,
        workers=args.workers,
        worker_type=args.kind,
        periodic=False,
        initial_delay=0.001,
        backoff=1.0,
        max_delay=0.001,
    ).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=["enqueue", "process", "latency", "sleep", "worker"])
    parser.add_argument("--storage", choices=["redis", "sqlite"], default="redis")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--sqlite", default="/tmp/huey-bench.db")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kind", choices=["thread", "process", "greenlet"], default="process")
    args = parser.parse_args()
    if args.measure == "sleep":
        process(args, sleeping=True)
    else:
        {"enqueue": enqueue, "process": process, "latency": latency, "worker": worker}[args.measure](args)


if __name__ == "__main__":
    main()
