"""The fixtures every test directory shares (loaded by tests/conftest.py as a plugin).

The deployment fixtures are parametrized over the harnesses: a test that takes
``deployment`` runs on every (broker, backend) pair of ``DEPLOYMENTS``; ``broker_deployment``
on every broker (with its companion backend where it has none), ``backend_deployment`` on every
result backend, ``lock_deployment`` on every lock. Nothing downstream looks at which driver it has.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .deployment import Deployment, make_deployment
from .harnesses import DEPLOYMENTS, HARNESSES
from .processes import Processes
from .servers import private_redis  # noqa: F401  (a fixture for every test directory)
from .services import require_amqp, require_redis


def unique(prefix: str = "t") -> str:
    """A name no other test (or xdist worker) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _param(names: tuple[str, str, str | None]) -> Any:
    marks = sorted({mark for name in names if name for mark in HARNESSES[name].marks})
    label = "+".join(dict.fromkeys(n for n in names if n))
    return pytest.param(names, id=label, marks=[getattr(pytest.mark, mark) for mark in marks])


def _pairing(name: str) -> tuple[str, str, str | None]:
    harness = HARNESSES[name]
    return (name if harness.broker else harness.companion, name if harness.backend else harness.companion, None)


BROKERS = [_param(_pairing(n)) for n, h in HARNESSES.items() if h.broker]
BACKENDS = [_param(_pairing(n)) for n, h in HARNESSES.items() if h.backend]
LOCKS = [_param((*_pairing(n)[:2], n)) for n, h in HARNESSES.items() if h.lock]
PAIRS = [_param((broker, backend, None)) for broker, backend in DEPLOYMENTS]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "known_gap(name): a behaviour some driver documents it cannot do (its harness's ``gaps``); "
        "a strict xfail there, with the documented reason",
    )
    config.addinivalue_line("markers", "across_processes: needs a store several processes share (skipped on memory://)")


@pytest.fixture
def queue_name() -> str:
    return unique("machinery_test_q")


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture
def amqp_url() -> str:
    return require_amqp()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Helper processes of this test (``support.procs``); none outlives it."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


def _deployment(request: pytest.FixtureRequest, tmp_path: Path, queue: str) -> Iterator[Deployment]:
    broker, backend, lock = request.param
    deployment = make_deployment(broker, backend, lock, request, tmp_path, queue)
    if request.node.get_closest_marker("across_processes") is not None:
        for harness in deployment.harnesses:
            if not harness.shared_across_processes:
                deployment.close()
                pytest.skip(f"{harness.name} lives inside one process: nothing is shared across processes")
    gap = request.node.get_closest_marker("known_gap")
    if gap is not None:
        for harness in deployment.harnesses:
            reason = harness.gaps.get(gap.args[0])
            if reason is not None:
                request.node.add_marker(pytest.mark.xfail(strict=True, reason=f"{harness.name}: {reason}"))
            unpromised = harness.unpromised.get(gap.args[0])
            if unpromised is not None:
                deployment.close()
                pytest.skip(f"{harness.name} does not promise this: {unpromised}")
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture(params=PAIRS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path, queue_name: str) -> Iterator[Deployment]:
    """Every (broker, backend) pair of ``DEPLOYMENTS``."""
    yield from _deployment(request, tmp_path, queue_name)


@pytest.fixture(params=BROKERS)
def broker_deployment(request: pytest.FixtureRequest, tmp_path: Path, queue_name: str) -> Iterator[Deployment]:
    """Every broker, with its own backend or its companion's."""
    yield from _deployment(request, tmp_path, queue_name)


@pytest.fixture(params=BACKENDS)
def backend_deployment(request: pytest.FixtureRequest, tmp_path: Path, queue_name: str) -> Iterator[Deployment]:
    """Every result backend, with its own broker or its companion's."""
    yield from _deployment(request, tmp_path, queue_name)


@pytest.fixture(params=LOCKS)
def lock_deployment(request: pytest.FixtureRequest, tmp_path: Path, queue_name: str) -> Iterator[Deployment]:
    """Every lock."""
    yield from _deployment(request, tmp_path, queue_name)
