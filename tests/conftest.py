"""Shared fixtures: one per service, per-test isolation, and a worker running beside the test.

A service that is not reachable is skipped with the reason on a laptop and fails the run
under CI (``CI=true``), so a green CI always means every backend was exercised.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

from machinery import Config, RedisConfig, Server, Worker
from machinery._sync import run_sync
from machinery.brokers.base import Consumer, Delivery

#: Fixtures of servers the tests start for themselves (each stopped by the PID it recorded).
pytest_plugins = ["support.redis_topologies", "support.memcached"]

REDIS_URL = os.environ.get("MACHINERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("MACHINERY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
INTEROP_DIR = Path(__file__).resolve().parent / "interop" / "captures"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
WAIT = 10.0  # upper bound for anything to happen; never an expectation of speed

T = TypeVar("T")


def require_service(name: str, url: str, default_port: int) -> None:
    """Skip (laptop) or fail (CI) unless ``url``'s host accepts TCP connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc.strerror or exc})"
        if IN_CI:
            pytest.fail(message + "; CI needs every service running", pytrace=False)
        pytest.skip(message)


def wait_until(predicate: Callable[[], T], timeout: float = WAIT, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` if it has not happened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def queue_name() -> str:
    return unique("machinery_test_q")


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", REDIS_URL, 6379)
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    require_service("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


def config_for(kind: str, tmp_path: Path, queue: str, **overrides: object) -> Config:
    """A Config on ``kind`` (memory, sqlite, redis) isolated from every other test."""
    if kind == "memory":
        url = f"memory://{queue}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'machinery.db'}"
    elif kind == "redis":
        require_service("Redis", REDIS_URL, 6379)
        url = REDIS_URL
    else:
        raise ValueError(kind)
    redis = RedisConfig(
        delayed_tasks_key=f"{queue}_delayed", normal_tasks_poll_period=200, delayed_tasks_poll_period=100
    )
    return Config(broker=url, default_queue=queue, redis=redis, **overrides)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_config(tmp_path: Path, queue_name: str) -> Callable[..., Config]:
    def make(kind: str, **overrides: object) -> Config:
        return config_for(kind, tmp_path, queue_name, **overrides)

    return make


@contextmanager
def running_worker(server: Server, **kwargs: object) -> Iterator[Worker]:
    """Run a worker of ``server`` on its own thread and loop for the duration of the block."""
    worker = server.new_worker(**kwargs)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(worker.arun())
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    if not worker.started.wait(10):
        raise RuntimeError(f"worker did not start: {errors}")
    try:
        yield worker
    finally:
        worker.quit()
        thread.join(15)
        assert not thread.is_alive(), "worker did not stop within 15 s"
        if errors:
            raise errors[0]


def waiting_bodies(server: Server) -> set[str]:
    """UUIDs of the tasks waiting in the default queue or for their ETA (requeued for later)."""
    return {s.uuid for s in server.get_pending_tasks()} | {s.uuid for s in server.get_delayed_tasks()}


def push_raw(server: Server, *bodies: bytes, queue: str | None = None) -> None:
    """Put bytes straight onto ``queue`` (the default queue), as a foreign client might."""
    run_sync(server.broker._push([(queue or server.config.default_queue, body) for body in bodies]))


def count_requeues(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every body the worker's consumer gives back to the queue."""
    requeued: list[bytes] = []
    open_consumer = server.broker.open_consumer

    async def opening(queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        consumer = await open_consumer(queue, consumer_tag, prefetch)
        requeue = consumer.requeue

        async def counting(delivery: Delivery, delay: float = 0.0) -> None:
            requeued.append(delivery.body)
            await requeue(delivery, delay)

        consumer.requeue = counting  # type: ignore[method-assign]
        return consumer

    monkeypatch.setattr(server.broker, "open_consumer", opening)
    return requeued
