"""Tracing and metrics across processes: a worker started with ``machinery worker
--metrics-port`` exports its spans with the OTLP exporter to a receiver this test starts, and
serves /metrics, which this test scrapes (and a real Prometheus too, where it is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from machinery import Config, Server, Signature
from machinery._sync import run_sync
from machinery.tracing import TracingMiddleware
from support.asgi import answers
from support.otlp import OtlpReceiver
from support.processes import stop_processes
from support.services import IN_CI, free_port
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parent  # apps.observed is tests/e2e/apps/observed.py
QUEUE = "observed_q"
PROMETHEUS = "/usr/bin/prometheus"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver().start()
    yield started
    started.stop()


def start_worker(
    tmp_path: Path,
    receiver: OtlpReceiver,
    metrics_port: int | None,
    propagators: str = "",
    extra_env: dict[str, str] | None = None,
    name: str = "worker",
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BROKER": f"sqlite:///{tmp_path / 'observed.db'}",
        "DEFAULT_QUEUE": QUEUE,
        "PYTHONPATH": str(TESTS),
        "OTLP_ENDPOINT": receiver.endpoint,
        "TRACE_PROPAGATORS": propagators,
        **(extra_env or {}),
    }
    log = tmp_path / f"{name}.log"
    metrics = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    command = [str(Path(sys.executable).with_name("machinery")), "worker", "-A", "apps.observed:server"]
    return subprocess.Popen(
        [*command, "-c", "2", "--no-periodic", "-n", name, *metrics],
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def client(tmp_path: Path, receiver: OtlpReceiver) -> Iterator[tuple[Server, TracerProvider]]:
    provider = TracerProvider(resource=Resource.create({"service.name": "client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    config = Config(broker=f"sqlite:///{tmp_path / 'observed.db'}", default_queue=QUEUE)
    yield Server(config, middleware=[TracingMiddleware(provider)]), provider
    provider.shutdown()


def test_a_trace_continues_from_the_client_into_the_worker_process(
    tmp_path: Path, receiver: OtlpReceiver, client: tuple[Server, TracerProvider], metrics_port: int
) -> None:
    server, provider = client
    with provider.get_tracer("app").start_as_current_span("checkout") as checkout:
        result = server.send_task(Signature("work", args=["orders"]))
    worker = start_worker(tmp_path, receiver, metrics_port)
    try:
        assert result.get(timeout=60) == "orders"
        (db,) = wait_until(lambda: receiver.named("db orders"), timeout=30, what="the task's own span")
    finally:
        stop_processes([worker], timeout=20)
    (send,) = receiver.named("send work")
    (process,) = receiver.named("process work")
    trace_id = format(checkout.get_span_context().trace_id, "032x")
    assert (send.service, process.service, db.service) == ("client", "worker", "worker")
    assert send.trace_id == process.trace_id == db.trace_id == trace_id
    assert process.parent_span_id == send.span_id
    assert db.parent_span_id == process.span_id
    assert process.attributes["messaging.destination.name"] == QUEUE


def test_a_go_peer_traced_with_jaeger_is_continued(tmp_path: Path, receiver: OtlpReceiver, metrics_port: int) -> None:
    # What a Go Machinery sender with a Jaeger tracer writes into Signature.Headers (TextMap format).
    go_trace, go_span = "5a1d0e3f9b8c7d6e4f3a2b1c0d9e8f7a", "1f2e3d4c5b6a7988"
    plain = Server(Config(broker=f"sqlite:///{tmp_path / 'observed.db'}", default_queue=QUEUE))
    result = plain.send_task(
        Signature("work", args=["from-go"], headers={"uber-trace-id": f"{go_trace}:{go_span}:0:1"})
    )
    worker = start_worker(tmp_path, receiver, metrics_port, propagators="jaeger")
    try:
        assert result.get(timeout=60) == "from-go"
        (process,) = wait_until(lambda: receiver.named("process work"), timeout=30, what="the process span")
    finally:
        stop_processes([worker], timeout=20)
    assert process.trace_id == go_trace
    assert process.parent_span_id == go_span


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_worker_metrics_port_serves_the_counters(tmp_path: Path, receiver: OtlpReceiver, metrics_port: int) -> None:
    plain = Server(Config(broker=f"sqlite:///{tmp_path / 'observed.db'}", default_queue=QUEUE))
    results = [plain.send_task(Signature("work", args=[f"n{i}"])) for i in range(3)]
    failed = plain.send_task(Signature("fail", args=["no"]))
    worker = start_worker(tmp_path, receiver, metrics_port)
    try:
        for result in results:
            result.get(timeout=60)
        with pytest.raises(Exception, match="no"):
            failed.get(timeout=60)
        text = wait_until(
            lambda: (
                answers(f"http://127.0.0.1:{metrics_port}/metrics")
                and 'state="failed",task="fail"} 1.0' in (t := scrape(metrics_port))
                and t
            ),
            timeout=30,
            what="the failure counted",
        )
    finally:
        stop_processes([worker], timeout=20)
    assert f'machinery_tasks_total{{queue="{QUEUE}",state="succeeded",task="work"}} 3.0' in text
    assert f'machinery_worker_up{{queue="{QUEUE}"}} 1.0' in text
    assert "machinery_task_duration_seconds_bucket" in text


def test_a_real_prometheus_scrapes_a_worker(tmp_path: Path, receiver: OtlpReceiver, metrics_port: int) -> None:
    if not shutil.which(PROMETHEUS):
        message = f"{PROMETHEUS} is missing (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    plain = Server(Config(broker=f"sqlite:///{tmp_path / 'observed.db'}", default_queue=QUEUE))
    results = [plain.send_task(Signature("work", args=[f"p{i}"])) for i in range(2)]
    prometheus_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: machinery\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    worker = start_worker(tmp_path, receiver, metrics_port)
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=(tmp_path / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    query = urllib.parse.quote(f'sum(machinery_tasks_total{{queue="{QUEUE}",state="succeeded"}})')

    def succeeded() -> float:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{prometheus_port}/api/v1/query?query={query}", timeout=5
            ) as r:
                data = json.load(r)["data"]["result"]
        except OSError:
            return 0.0
        return float(data[0]["value"][1]) if data else 0.0

    try:
        for result in results:
            result.get(timeout=60)
        assert wait_until(lambda: succeeded() >= 2, timeout=60, what="Prometheus seeing the two successes")
    finally:
        stop_processes([worker, prometheus], timeout=20)


def test_multiprocess_mode_aggregates_every_worker_on_one_port(
    tmp_path: Path, receiver: OtlpReceiver, metrics_port: int
) -> None:
    shared = tmp_path / "prometheus-multiproc"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    plain = Server(Config(broker=f"sqlite:///{tmp_path / 'observed.db'}", default_queue=QUEUE))
    serving = start_worker(tmp_path, receiver, metrics_port, extra_env=env, name="serving")
    other = start_worker(tmp_path, receiver, None, extra_env=env, name="other")
    try:
        wait_until(lambda: len(run_sync(plain.backend.get_workers())) == 2, timeout=30, what="both workers up")
        results = [plain.send_task(Signature("work", args=[f"m{i}"])) for i in range(10)]
        for result in results:
            result.get(timeout=60)
        expected = f'machinery_tasks_total{{queue="{QUEUE}",state="succeeded",task="work"}} 10.0'
        text = wait_until(
            lambda: (
                answers(f"http://127.0.0.1:{metrics_port}/metrics") and expected in (t := scrape(metrics_port)) and t
            ),
            timeout=30,
            what="the tasks of both workers counted on one port",
        )
    finally:
        stop_processes([serving, other], timeout=20)
    assert f'machinery_worker_up{{queue="{QUEUE}"}} 2.0' in text
