"""An app with tracing and metrics, configured from the environment as any app would be
(``BROKER``, ``DEFAULT_QUEUE``...), plus:

* ``OTLP_ENDPOINT``: export spans there with the OTLP/HTTP exporter (service ``worker``);
* ``TRACE_PROPAGATORS``: ``jaeger`` to read and write ``uber-trace-id`` beside W3C's headers.
"""

from __future__ import annotations

import os
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.jaeger import JaegerPropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from machinery import Config, Middleware, Server
from machinery.metrics import MetricsMiddleware
from machinery.tracing import TracingMiddleware

provider = TracerProvider(resource=Resource.create({"service.name": "worker"}))
if os.environ.get("OTLP_ENDPOINT"):
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=os.environ["OTLP_ENDPOINT"])))
propagator: TextMapPropagator | None = None
if os.environ.get("TRACE_PROPAGATORS") == "jaeger":
    propagator = CompositePropagator([TraceContextTextMapPropagator(), JaegerPropagator()])

middleware: list[Middleware] = [TracingMiddleware(provider, propagator), MetricsMiddleware()]
server = Server(Config.from_env(), middleware=middleware)


@server.task
def work(label: str) -> str:
    """A ``def`` task (on a thread) whose own span nests under the worker's process span."""
    with provider.get_tracer("app").start_as_current_span(f"db {label}"):
        return label


@server.task
def fail(message: str) -> None:
    raise RuntimeError(message)


@server.task
def slow(seconds: float) -> float:
    """Runs for ``seconds`` (the dashboard test watches it in flight)."""
    time.sleep(seconds)
    return seconds
