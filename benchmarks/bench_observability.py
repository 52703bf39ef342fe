"""What tracing and metrics cost on the hot path: enqueue and drain rates on Redis with
no middleware, MetricsMiddleware, TracingMiddleware, and both.

    python benchmarks/bench_observability.py [--tasks 20000] [--rounds 3]

Each round runs every mode once, in turn (so a busy moment on a shared machine touches all
modes alike), against a fresh queue and a worker in its own process (concurrency 100):
  enqueue   the tasks sent with asend_task, 100 in flight, by a Server with the mode's middleware
  drain     the same tasks drained by one worker process with the mode's middleware, from its
            first heartbeat until the queue and its processing list are empty
  cpu       the worker process's CPU time (user + system, from /proc) per task over the drain
            (start-up left out): less disturbed than rates by other work on a shared machine
With ``--baseline SRC`` (another checkout's ``src``, e.g. main's) a mode ``baseline`` joins each
round: no middleware, with the worker process running the code in SRC, to show that a worker
without the middleware is not slower than before.
Tracing uses the OpenTelemetry SDK with a BatchSpanProcessor and an exporter that drops the
batches: it measures making, recording and propagating spans, not a collector's network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))
from bench_redis import enqueue_with, wait_drained, wait_for_worker
from bench_tasks import make_server, stop

MODES = ("none", "metrics", "tracing", "both")
HERE = Path(__file__).resolve()


def middleware_for(mode: str) -> list[object]:
    """The middleware of ``mode``, made only when asked (``none`` imports neither library)."""
    made: list[object] = []
    if mode in ("metrics", "both"):
        from machinery.metrics import MetricsMiddleware

        made.append(MetricsMiddleware())
    if mode in ("tracing", "both"):
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from machinery.tracing import TracingMiddleware

        class Dropping(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropping()))
        made.append(TracingMiddleware(provider))
    return made


def server_for(queue: str, mode: str) -> object:
    server = make_server(queue)
    for middleware in middleware_for(mode):
        server.add_middleware(middleware)  # type: ignore[arg-type]
    return server


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(queue: str, concurrency: int, mode: str, baseline: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if mode == "baseline" and baseline:
        env["PYTHONPATH"] = baseline  # ahead of this checkout's installed package
    worker_mode = "none" if mode == "baseline" else mode
    return subprocess.Popen([sys.executable, str(HERE), "--worker", queue, str(concurrency), worker_mode], env=env)


async def one(
    client: aioredis.Redis, mode: str, tasks: int, concurrency: int, baseline: str | None
) -> tuple[float, float, float]:
    queue = f"bench_obs_{mode}_{uuid.uuid4().hex[:8]}"
    enqueue_s = await enqueue_with(server_for(queue, "none" if mode == "baseline" else mode), "noop", tasks)  # type: ignore[arg-type]
    worker = start_worker(queue, concurrency, mode, baseline)
    started = await wait_for_worker(client, queue, worker)
    cpu_started = cpu_seconds(worker.pid)
    finished = await wait_drained(client, queue, worker)
    cpu = cpu_seconds(worker.pid) - cpu_started
    stop(worker)
    return tasks / enqueue_s, tasks / (finished - started), cpu / tasks * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--baseline", metavar="SRC", help="also run mode 'baseline': a worker on the code in SRC")
    args = parser.parse_args()
    client = aioredis.Redis.from_url(os.environ.get("BROKER", "redis://127.0.0.1:6379/0"))
    modes = args.modes.split(",")
    if args.baseline:
        modes.insert(0, "baseline")
    rates: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in modes}
    for round_no in range(args.rounds):
        for mode in modes:
            measured = await one(client, mode, args.tasks, args.concurrency, args.baseline)
            rates[mode].append(measured)
            enqueue_rate, drain_rate, cpu = measured
            print(
                f"round {round_no + 1}  {mode:<8} enqueue {enqueue_rate:8,.0f}/s   drain {drain_rate:8,.0f}/s   "
                f"cpu {cpu:6.1f} µs/task",
                flush=True,
            )
    print()
    for mode in modes:
        enq, dra, cpu = ([m[i] for m in rates[mode]] for i in range(3))
        print(
            f"{mode:<8} enqueue median {statistics.median(enq):8,.0f}/s (range {min(enq):,.0f} - {max(enq):,.0f})   "
            f"drain median {statistics.median(dra):8,.0f}/s (range {min(dra):,.0f} - {max(dra):,.0f})   "
            f"cpu median {statistics.median(cpu):6.1f} µs/task (range {min(cpu):.1f} - {max(cpu):.1f})"
        )
    await client.aclose()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_queue, worker_concurrency, worker_mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        server_for(worker_queue, worker_mode).new_worker("bench", worker_concurrency).launch()  # type: ignore[attr-defined]
    else:
        asyncio.run(main())
