"""Drain rate on a Redis Cluster (3 primaries, 3 replicas), with 1 and 2 worker processes.

    python benchmarks/bench_redis_cluster.py [--tasks 20000] [--concurrency 100]

Starts its own 6-node cluster on free loopback ports (redis-server and redis-cli must be on
PATH; the nodes are stopped by PID at the end). For each worker count: start the worker
processes on an empty queue, wait for each one's heartbeat, push ``--tasks`` no-op messages
(Go's format, RPUSH in batches of 1,000), and time from the first push until the queue and
every processing list are empty. The queue is one list, so one primary serves every take and
ack; the task states spread over the three primaries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_tasks import start_worker, stop

from machinery import Signature
from machinery.brokers.redis import heartbeats_key, processing_prefix
from support.redis_topologies import redis_cluster


async def drain(url: str, nodes: list[int], queue: str, tasks: int, workers: int, concurrency: int) -> float:
    client = aioredis.RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in nodes])
    os.environ["BROKER"] = url
    processes = [start_worker(queue, str(concurrency)) for _ in range(workers)]
    try:
        while await client.zcard(heartbeats_key(queue)) < workers:
            for process in processes:
                if process.poll() is not None:
                    raise SystemExit(f"a benchmark worker exited with code {process.returncode}")
            await asyncio.sleep(0.01)
        bodies = [Signature("noop", routing_key=queue).encode() for _ in range(tasks)]
        started = time.perf_counter()
        for i in range(0, tasks, 1000):
            await client.rpush(queue, *bodies[i : i + 1000])
        while True:
            consumers = await client.zrange(heartbeats_key(queue), 0, -1)
            lengths = [await client.llen(queue)]
            lengths += [await client.llen(processing_prefix(queue) + c.decode()) for c in consumers]
            if not any(lengths):
                return time.perf_counter() - started
            await asyncio.sleep(0.005)
    finally:
        for process in processes:
            stop(process)
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, redis_cluster(Path(folder)) as cluster:
        ports = [node.port for node in cluster.nodes]
        for workers in (1, 2):
            queue = f"bench_cluster_{uuid.uuid4().hex[:8]}"
            seconds = await drain(cluster.url, ports, queue, args.tasks, workers, args.concurrency)
            print(
                f"drain    {args.tasks / seconds:10,.0f} tasks/s   ({args.tasks} in {seconds:.2f} s, "
                f"{workers} worker process{'es' if workers > 1 else ''}, concurrency {args.concurrency} each)"
            )


if __name__ == "__main__":
    asyncio.run(main())
