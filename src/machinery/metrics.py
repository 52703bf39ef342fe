"""Prometheus metrics as middleware: ``Server(config, middleware=[MetricsMiddleware()])``, or
``machinery worker --metrics-port 9808``, which adds it and serves ``/metrics``.

Install with ``pip install 'machinery[metrics]'``. The metrics:

* ``machinery_tasks_total{task,queue,state}``: counter; state is started, succeeded, failed
  or retried;
* ``machinery_task_duration_seconds{task,queue}``: histogram of how long the task function ran;
* ``machinery_queue_latency_seconds{task,queue}``: histogram of the time from publish (or the
  ETA, when later) to the start; the publishing Server must have the middleware too, since
  it stamps the time in the header ``machinery_sent_at``;
* ``machinery_tasks_in_flight{queue}``: gauge of the tasks being processed;
* ``machinery_dead_letters_total{queue}``: counter of the messages this worker dead-lettered;
* ``machinery_queue_depth{queue}``: gauge of the messages waiting, sampled every
  ``depth_interval`` seconds by each worker for its queue;
* ``machinery_worker_up{queue}``: gauge, 1 while a worker runs.

Several worker processes on one host: give each its own ``--metrics-port``, or use
prometheus_client's multiprocess mode (set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory
for every process, and serve ``registry()``, which then aggregates all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import log
from .errors import MessageDecodeError, MissingExtra, UnsupportedOperation
from .middleware import Middleware, Outcome
from .signature import Signature
from .state import FAILURE, RETRY, SUCCESS

try:
    import prometheus_client
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtra(f"machinery.metrics needs prometheus-client: pip install 'machinery[metrics]' ({exc})") from exc

__all__ = ["MetricsMiddleware", "SENT_AT_HEADER", "asgi_app", "registry", "serve"]

#: The header in which a publishing Server with this middleware stamps the time (Unix seconds).
SENT_AT_HEADER = "machinery_sent_at"
_STATES = {SUCCESS: "succeeded", FAILURE: "failed", RETRY: "retried"}
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class _Metrics:
    """The metrics registered in one registry (prometheus_client refuses a name twice)."""

    tasks: Counter
    duration: Histogram
    latency: Histogram
    in_flight: Gauge
    dead_letters: Counter
    depth: Gauge
    up: Gauge


_registered: dict[int, tuple[CollectorRegistry, _Metrics]] = {}
_registering = threading.Lock()


def _metrics_in(registry: CollectorRegistry) -> _Metrics:
    with _registering:
        held = _registered.get(id(registry))
        if held is not None and held[0] is registry:
            return held[1]
        made = _Metrics(
            tasks=Counter(
                "machinery_tasks", "Tasks by task name, queue and state", ("task", "queue", "state"), registry=registry
            ),
            duration=Histogram(
                "machinery_task_duration_seconds",
                "Seconds the task function ran",
                ("task", "queue"),
                buckets=_DURATION_BUCKETS,
                registry=registry,
            ),
            latency=Histogram(
                "machinery_queue_latency_seconds",
                "Seconds from publish (or the ETA) to the start of processing",
                ("task", "queue"),
                buckets=_DURATION_BUCKETS,
                registry=registry,
            ),
            in_flight=Gauge(
                "machinery_tasks_in_flight",
                "Tasks being processed",
                ("queue",),
                registry=registry,
                multiprocess_mode="livesum",
            ),
            dead_letters=Counter(
                "machinery_dead_letters", "Messages dead-lettered by workers", ("queue",), registry=registry
            ),
            depth=Gauge(
                "machinery_queue_depth",
                "Messages waiting in the queue (sampled)",
                ("queue",),
                registry=registry,
                multiprocess_mode="livemax",
            ),
            up=Gauge(
                "machinery_worker_up", "Workers running", ("queue",), registry=registry, multiprocess_mode="livesum"
            ),
        )
        _registered[id(registry)] = (registry, made)
        return made


class MetricsMiddleware(Middleware):
    """Counts, times and samples what workers do (see the module docstring).

    The metrics are registered in ``registry`` (prometheus_client's default registry unless
    given); every middleware made on one registry shares its metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None, depth_interval: float = 5.0) -> None:
        metrics = _metrics_in(REGISTRY if registry is None else registry)
        self.depth_interval = depth_interval
        self.tasks = metrics.tasks
        self.duration = metrics.duration
        self.latency = metrics.latency
        self.in_flight = metrics.in_flight
        self.dead_letters = metrics.dead_letters
        self.depth = metrics.depth
        self.up = metrics.up
        # Children by label values: labels() takes a lock and builds a key each call.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._samplers: dict[int, tuple[asyncio.Task[None], str]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ------------------------------------------------------------------ hooks

    def before_publish(self, signature: Signature) -> None:
        if signature.headers is None:
            signature.headers = {}
        signature.headers[SENT_AT_HEADER] = f"{time.time():.6f}"

    def before_process(self, signature: Signature) -> None:
        name, queue = signature.name, signature.routing_key or self._worker_queue()
        self._child(self.tasks, name, queue, "started").inc()
        self._child(self.in_flight, queue).inc()
        sent = (signature.headers or {}).get(SENT_AT_HEADER)
        if sent is None:
            return
        try:
            since = float(sent)
        except ValueError:
            return
        if signature.eta is not None:
            since = max(since, signature.eta.timestamp())
        self._child(self.latency, name, queue).observe(max(0.0, time.time() - since))

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        name, queue = signature.name, signature.routing_key or self._worker_queue()
        self._child(self.in_flight, queue).dec()
        self._child(self.tasks, name, queue, _STATES.get(outcome.state, outcome.state.lower())).inc()
        self._child(self.duration, name, queue).observe(outcome.duration)

    def after_dead_letter(self, body: bytes, reason: str) -> None:
        self._child(self.dead_letters, self._queue_of(body)).inc()

    def _queue_of(self, body: bytes) -> str:
        """The queue a dead letter came from: its routing key if it decodes, else the queue of
        this middleware's worker (a process runs one worker, each on one queue)."""
        with contextlib.suppress(MessageDecodeError):
            queue = Signature.decode(body).routing_key
            if queue:
                return queue
        return self._worker_queue()

    def _worker_queue(self) -> str:
        """The queue of this middleware's worker ("unknown" when several workers share it)."""
        queues = {queue for _, queue in self._samplers.values()}
        return queues.pop() if len(queues) == 1 else "unknown"

    async def worker_boot(self, worker: Any) -> None:
        queue = str(worker.queue)
        self._child(self.up, queue).inc()
        sampler = asyncio.create_task(self._sample(worker.server.broker.queue_depth, queue))
        self._samplers[id(worker)] = (sampler, queue)

    async def worker_shutdown(self, worker: Any) -> None:
        held = self._samplers.pop(id(worker), None)
        if held is None:
            return
        sampler, queue = held
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        self._child(self.up, queue).dec()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not self._samplers:
            # The "live" gauges of a process count until it says it is gone.
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    async def _sample(self, depth_of: Callable[[str], Any], queue: str) -> None:
        gauge = self._child(self.depth, queue)
        while True:
            try:
                gauge.set(await depth_of(queue))
            except UnsupportedOperation as exc:
                log.logger.info("Not sampling the depth of %r: %s", queue, exc)
                return
            except Exception as exc:  # an outage: the worker reports it; sample again later
                log.logger.debug("Sampling the depth of %r failed: %s", queue, exc)
            await asyncio.sleep(self.depth_interval)


# --------------------------------------------------------------------------- serving


def registry() -> CollectorRegistry:
    """The registry to serve: the default one, or under ``PROMETHEUS_MULTIPROC_DIR`` one that
    aggregates every process's metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregated = CollectorRegistry()
        MultiProcessCollector(aggregated)  # type: ignore[no-untyped-call]
        return aggregated
    return REGISTRY


def serve(port: int, host: str = "127.0.0.1", served: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the HTTP server
    (``.shutdown()`` stops it). ``port`` 0 picks a free one (``.server_port``)."""
    server, _thread = prometheus_client.start_http_server(port, host, registry() if served is None else served)
    return server


def asgi_app(served: CollectorRegistry | None = None) -> Any:
    """``/metrics`` as an ASGI app to mount in an existing one (Starlette, FastAPI...)."""
    return prometheus_client.make_asgi_app(registry() if served is None else served)
