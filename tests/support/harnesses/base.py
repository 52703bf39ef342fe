"""The harness interface: what the contract suite needs to know of one driver.

Each driver (a broker, a result backend, a lock, or several of these at one URL) supplies one
``Harness`` subclass in this package and one line in ``HARNESSES`` (``harnesses/__init__.py``).
The contract suite (``tests/contract/``) runs every scenario through these methods and never
looks at which driver it has; a driver's own test file (``tests/drivers/``) keeps only what is
specific to it (key layout, topology, restarts).

A harness is made per test by the ``harness`` fixtures: ``setup`` may start or require a
server (through other fixtures of ``request``), and skips on a laptop or fails under CI when
the service is absent (``support.services.require_service``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from machinery import Config, RedisConfig, Server
from machinery.brokers.base import Consumer

#: Results and group metadata written by tests expire within minutes, never an hour.
TEST_RESULTS_EXPIRE_IN = 600
#: Short enough for the reclaim tests to see a silent consumer's messages come back quickly.
TEST_HEARTBEAT_TIMEOUT = 3.0


class Harness:
    """How the contract suite configures, feeds, inspects and cleans up after one driver."""

    #: The name tests are parametrized with (``memory``, ``sqlite``, ``redis``, ``amqp``...).
    name: ClassVar[str]
    #: The seams this driver's URL serves.
    broker: ClassVar[bool] = True
    backend: ClassVar[bool] = True
    lock: ClassVar[bool] = True
    #: The pytest marks of tests on this driver (``redis``, ``amqp``, ``slow``...).
    marks: ClassVar[tuple[str, ...]] = ()
    #: The harness that serves the seams this driver lacks (a broker-only driver's result
    #: backend and lock, a backend-only driver's broker) when the suite pairs it for a test.
    companion: ClassVar[str] = "redis"
    #: Behaviours this driver documents it cannot do: name -> the documented reason. A test
    #: marked ``@pytest.mark.known_gap("name")`` is a strict xfail on it (it must fail there).
    gaps: ClassVar[dict[str, str]] = {}
    #: Behaviours this driver does not promise although it usually shows them (a standard SQS
    #: queue may hand one message to two receivers): a strict xfail would fail on the runs
    #: where the behaviour happens to hold, so a test marked ``known_gap("name")`` is skipped
    #: on it with the reason instead.
    unpromised: ClassVar[dict[str, str]] = {}
    #: The share of a load test's message count this driver's test server carries in
    #: reasonable time (moto's SQS runs about a hundredth as fast as Redis); the scenario and
    #: its assertions stay the same.
    load_scale: ClassVar[float] = 1.0
    #: False for a driver whose store lives inside one process (``memory://``): tests marked
    #: ``@pytest.mark.across_processes`` are skipped on it, since there is nothing to share.
    shared_across_processes: ClassVar[bool] = True

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        #: The latest ETA the test's servers published (set by the deployment before
        #: ``cleanup``): a store that keeps delayed messages elsewhere may need to look there.
        self.latest_eta: datetime | None = None

    def setup(self) -> None:
        """Make sure the service is there (skip on a laptop, fail under CI); start it if the
        harness owns it. Called once per test before anything else."""

    def prepare(self, server: Server, queue: str) -> None:
        """Bring ``queue`` into being as a deployment where a worker has run would have it
        (RabbitMQ: the worker's queue and binding). Called for every server a test makes."""

    # ------------------------------------------------------------------ configuration

    def url(self, queue: str) -> str:
        """The URL of this driver for a test whose queue is ``queue``."""
        raise NotImplementedError

    def config_overrides(self, queue: str) -> dict[str, Any]:
        """Config fields this driver needs beyond its URL (sections such as ``redis=...``)."""
        return {}

    def config(self, queue: str, **overrides: Any) -> Config:
        """A Config with this driver as broker, backend and lock, isolated by ``queue``."""
        return make_config(queue, broker=self, backend=self, **overrides)

    # ------------------------------------------------------------------ broker side

    async def push_raw(self, server: Server, queue: str, body: bytes) -> None:
        """Put ``body`` on ``queue`` exactly as given, as a foreign (Go) client would."""
        await server.broker._push([(queue, body)])

    async def queued_bodies(self, server: Server, queue: str) -> list[bytes]:
        """The raw bodies ready on ``queue``, oldest first, left in place (undecodable ones too)."""
        raise NotImplementedError

    async def taken_count(self, server: Server, queue: str) -> int:
        """How many messages of ``queue`` some consumer has taken and not settled."""
        raise NotImplementedError

    def abandon(self, consumer: Consumer) -> None:
        """Make ``consumer`` die without closing (as a SIGKILLed worker would): it stops
        renewing what it holds, and the broker must hand its messages to others."""
        raise NotImplementedError

    # ------------------------------------------------------------------ backend side

    async def expiry(self, server: Server, task_uuid: str) -> float | None:
        """Seconds until the stored state of ``task_uuid`` expires, as the store sees it; None
        when there is no state. Raise ``pytest.skip`` if the store has no such notion."""
        raise NotImplementedError

    # ------------------------------------------------------------------ cleaning up

    async def cleanup(self, server: Server, queue: str, ids: Iterable[str]) -> None:
        """Remove what a test left in the shared service: ``queue`` and everything beside it
        (delayed set, dead letters, processing lists, heartbeats), and the states and group
        metadata of ``ids`` (every task, chord callback and group UUID the test sent)."""


def make_config(queue: str, broker: Harness, backend: Harness, **overrides: Any) -> Config:
    """A Config with ``broker``'s URL as broker and ``backend``'s as result backend (and lock,
    when it serves one), isolated from every other test by ``queue``."""
    fields: dict[str, Any] = {
        "broker": broker.url(queue),
        "result_backend": backend.url(queue),
        "default_queue": queue,
        "results_expire_in": TEST_RESULTS_EXPIRE_IN,
        "heartbeat_timeout": TEST_HEARTBEAT_TIMEOUT,
        "redis": RedisConfig(
            delayed_tasks_key=f"{queue}_delayed", normal_tasks_poll_period=200, delayed_tasks_poll_period=100
        ),
    }
    if not backend.lock:
        fields["lock"] = broker.url(queue) if broker.lock else f"memory://{queue}"
    fields.update(broker.config_overrides(queue))
    if backend is not broker:
        fields.update(backend.config_overrides(queue))
    fields.update(overrides)
    return Config(**fields)
