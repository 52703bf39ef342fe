"""CPU cost of the tracing and metrics middleware per task, without a broker:

    python benchmarks/bench_middleware_cost.py [--tasks 20000] [--repeat 5]

Calls each middleware's hooks as a worker and a sender do (``before_publish`` +
``after_publish`` for a send; ``before_process`` + ``after_process`` for a task) on
``--tasks`` signatures and prints microseconds per call pair, best of ``--repeat`` runs (the
least disturbed by other work on the machine). Tracing records spans with the SDK into a
BatchSpanProcessor whose exporter drops them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from machinery import Signature
from machinery.metrics import MetricsMiddleware
from machinery.middleware import Middleware, Outcome
from machinery.tracing import TracingMiddleware


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_pair(middleware: Middleware, tasks: int, repeat: int) -> tuple[float, float]:
    """Best microseconds per (send, process) of ``middleware`` over ``repeat`` runs."""
    outcome = Outcome("SUCCESS", duration=0.001)
    best_send = best_process = float("inf")
    for run in range(repeat):
        signatures = [Signature("noop", uuid=f"task_{run}_{i}", routing_key="q") for i in range(tasks)]
        started = time.perf_counter()
        for signature in signatures:
            middleware.before_publish(signature)
            middleware.after_publish(signature)
        best_send = min(best_send, (time.perf_counter() - started) / tasks * 1e6)
        started = time.perf_counter()
        for signature in signatures:
            middleware.before_process(signature)
            middleware.after_process(signature, outcome)
        best_process = min(best_process, (time.perf_counter() - started) / tasks * 1e6)
    return best_send, best_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    for name, middleware in (
        ("metrics", MetricsMiddleware(CollectorRegistry())),
        ("tracing", TracingMiddleware(provider)),
    ):
        send, process = per_pair(middleware, args.tasks, args.repeat)
        print(f"{name:<8} send {send:6.1f} µs   process {process:6.1f} µs   (best of {args.repeat} x {args.tasks})")
    provider.shutdown()


if __name__ == "__main__":
    main()
