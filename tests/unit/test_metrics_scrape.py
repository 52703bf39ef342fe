"""Metrics in one process: a worker with MetricsMiddleware, scraped over HTTP."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from machinery import Config, Server, Signature
from machinery.metrics import SENT_AT_HEADER, MetricsMiddleware, asgi_app, serve
from support.asgi import serving
from support.configs import push_raw
from support.fixtures import unique
from support.waiting import wait_until
from support.workers import running_worker


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url`` by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def server(registry: CollectorRegistry) -> Server:
    queue = unique("metered")
    made = Server(
        Config(broker=f"memory://{queue}", default_queue=queue),
        middleware=[MetricsMiddleware(registry, depth_interval=0.05)],
    )

    @made.task(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @made.task(name="explode")
    async def explode() -> None:
        raise ValueError("kaboom")

    return made


@pytest.fixture
def metrics_url(registry: CollectorRegistry) -> Iterator[str]:
    http = serve(0, "127.0.0.1", registry)
    yield f"http://127.0.0.1:{http.server_port}/metrics"
    http.shutdown()


def test_counters_histograms_and_gauges_are_served(server: Server, metrics_url: str) -> None:
    queue = server.config.default_queue
    signatures = [Signature("add", args=[1, 2]) for _ in range(3)]
    waiting = [server.send_task(s) for s in signatures]
    assert signatures[0].headers and SENT_AT_HEADER in signatures[0].headers
    with running_worker(server, concurrency=2):
        for result in waiting:
            assert result.get(timeout=10) == 3
        with pytest.raises(Exception, match="kaboom"):
            server.send_task(Signature("explode")).get(timeout=10)
        push_raw(server, b"not a task")
        samples = wait_until(
            lambda: (
                (s := scrape(metrics_url)).get(("machinery_dead_letters_total", (("queue", queue),)))
                and s.get(("machinery_queue_depth", (("queue", queue),))) == 0
                and s
            ),
            what="the dead letter counted and the emptied queue sampled",
        )
        assert samples[("machinery_worker_up", (("queue", queue),))] == 1
    assert samples[("machinery_tasks_total", (("queue", queue), ("state", "started"), ("task", "add")))] == 3
    assert samples[("machinery_tasks_total", (("queue", queue), ("state", "succeeded"), ("task", "add")))] == 3
    assert samples[("machinery_tasks_total", (("queue", queue), ("state", "failed"), ("task", "explode")))] == 1
    assert samples[("machinery_task_duration_seconds_count", (("queue", queue), ("task", "add")))] == 3
    assert samples[("machinery_queue_latency_seconds_count", (("queue", queue), ("task", "add")))] == 3
    assert samples[("machinery_tasks_in_flight", (("queue", queue),))] == 0
    after = scrape(metrics_url)
    assert after[("machinery_worker_up", (("queue", queue),))] == 0


def test_each_worker_samples_the_depth_of_its_own_queue(server: Server, metrics_url: str) -> None:
    queue = server.config.default_queue
    with running_worker(server, queue=unique("other")) as worker:
        other = worker.queue
        for _ in range(4):
            server.send_task(Signature("add", args=[1, 1], routing_key=other))
        # The worker consumes ``other``; the depth of the default queue is not its business.
        wait_until(
            lambda: scrape(metrics_url).get(("machinery_queue_depth", (("queue", other),))) == 0,
            what="the depth sampled after the tasks ran",
        )
    assert ("machinery_queue_depth", (("queue", queue),)) not in scrape(metrics_url)


def test_the_asgi_app_serves_the_same_metrics(registry: CollectorRegistry, server: Server) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/metrics", app=asgi_app(registry))])
    with running_worker(server):
        assert server.send_task(Signature("add", args=[2, 2])).get(timeout=10) == 4
    with serving(app) as base:
        samples = scrape(f"{base}/metrics/")
    queue = server.config.default_queue
    assert samples[("machinery_tasks_total", (("queue", queue), ("state", "succeeded"), ("task", "add")))] == 1


def test_middleware_made_twice_on_one_registry_share_its_metrics(registry: CollectorRegistry) -> None:
    first, second = MetricsMiddleware(registry), MetricsMiddleware(registry)
    assert first.tasks is second.tasks
    assert MetricsMiddleware(CollectorRegistry()).tasks is not first.tasks
