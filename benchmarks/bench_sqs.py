"""Throughput and latency of the SQS broker against a LOCAL server (moto), Redis result backend.

    python benchmarks/bench_sqs.py [--tasks 2000] [--latency-tasks 200] [--concurrency 100]
                                   [--result-backend URL]

moto's server is started on a free loopback port (and stopped) unless $BROKER names an SQS
queue base already; the figures are those of moto in Python on this machine, not of AWS,
where each request costs a network round trip to the region instead. Measures, against a
fresh queue and a worker in its own process:
  enqueue   N no-op tasks sent with asend_task (PENDING write + SendMessage), 100 in flight
  drain     the same N drained by one worker process (ReceiveMessage in tens, DeleteMessage
            per ack), until every task's SUCCESS is stored
  latency   sequential round trips (send, then wait for the result), worker concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_tasks import TASKS, latency_line, round_trips, start_worker, stop

from machinery import Config, Server, Signature, SQSConfig

HERE = Path(__file__).resolve()
DEFAULT_BACKEND = "redis://127.0.0.1:6379/0"


def make_server(broker: str, queue: str, backend: str) -> Server:
    sqs = SQSConfig(create_missing=True, wait_time_seconds=1, visibility_timeout=30)
    server = Server(Config(broker=broker, result_backend=backend, default_queue=queue, sqs=sqs))
    server.register_tasks(TASKS)
    return server


def start_moto() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    program = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    process = subprocess.Popen(
        [program, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}/123456789012", process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


async def enqueue(server: Server, count: int, in_flight: int = 100) -> tuple[float, list[str]]:
    semaphore = asyncio.Semaphore(in_flight)
    uuids: list[str] = []

    async def send() -> None:
        async with semaphore:
            uuids.append((await server.asend_task(Signature("noop"))).task_uuid)

    started = time.perf_counter()
    await asyncio.gather(*(send() for _ in range(count)))
    return time.perf_counter() - started, uuids


async def wait_all_succeeded(server: Server, uuids: list[str]) -> float:
    pending = list(uuids)
    while pending:
        states = await server.backend.get_states(pending)
        pending = [u for u, s in zip(pending, states, strict=True) if s is None or s.state != "SUCCESS"]
        if pending:
            await asyncio.sleep(0.05)
    return time.perf_counter()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--result-backend", default=os.environ.get("RESULT_BACKEND", DEFAULT_BACKEND))
    args = parser.parse_args()
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["DISABLE_STRICT_SQS_CHECK"] = "1"
    moto = None
    broker = os.environ.get("BROKER", "")
    if not broker:
        broker, moto = start_moto()
    backend, run = args.result_backend, uuid.uuid4().hex[:8]
    print(f"SQS broker {broker} ({'local moto server' if moto else 'given'}) + backend {backend}")
    try:
        queue = f"bench_sqs_{run}"
        server = make_server(broker, queue, backend)
        try:
            enqueue_s, uuids = await enqueue(server, args.tasks)
            started = time.perf_counter()
            worker = start_worker("--worker", broker, queue, backend, str(args.concurrency), script=HERE)
            finished = await wait_all_succeeded(server, uuids)
            drain_s = finished - started
            rss = stop(worker)
            print(
                f"enqueue  {args.tasks / enqueue_s:10,.0f} tasks/s   ({args.tasks} in {enqueue_s:.2f} s, 100 in flight)"
            )
            print(
                f"drain    {args.tasks / drain_s:10,.0f} tasks/s   ({args.tasks} in {drain_s:.2f} s from the worker's "
                f"start, 1 worker process, concurrency {args.concurrency})"
            )
            await server.broker.delete_queue(queue)
        finally:
            await server.aclose()
        queue = f"bench_sqs_latency_{run}"
        server = make_server(broker, queue, backend)
        try:
            await server.broker.ensure_queue(queue)  # type: ignore[attr-defined]
            worker = start_worker("--worker", broker, queue, backend, "1", script=HERE)
            samples = await round_trips(server, args.latency_tasks, timeout=60)
            stop(worker)
            await server.broker.delete_queue(queue)
        finally:
            await server.aclose()
        print(latency_line(samples))
        print(f"rss      {rss:.1f} MB peak worker RSS (drain run)")
    finally:
        if moto is not None:
            os.killpg(moto.pid, signal.SIGTERM)
            moto.wait(10)


def worker_main(argv: list[str]) -> None:
    broker, queue, backend, concurrency = argv[0], argv[1], argv[2], int(argv[3])
    make_server(broker, queue, backend).new_worker("bench", concurrency).launch()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        asyncio.run(main())
