"""The services the tests talk to, and what happens when one is missing.

A service that is not reachable is skipped with the reason on a laptop and fails the run
under CI (``CI=true``), so a green CI always means every driver was exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from typing import NoReturn
from urllib.parse import unquote, urlsplit

import pytest

#: A database of its own on the shared server: the suite's cleanup checks scan the keyspace, and
#: must not walk the keys of applications or benchmark runs in database 0.
REDIS_URL = os.environ.get("MACHINERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
AMQP_URL = os.environ.get("MACHINERY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(message: str) -> NoReturn:
    """Skip the test (laptop) or fail it (CI) because something it needs is absent."""
    if IN_CI:
        pytest.fail(message + "; CI needs every service running", pytrace=False)
    pytest.skip(message)


def require_service(name: str, url: str, default_port: int) -> None:
    """Skip (laptop) or fail (CI) unless ``url``'s host accepts TCP connections."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        missing(f"{name} is not reachable at {host}:{port} ({exc.strerror or exc})")


def require_redis() -> str:
    require_service("Redis", REDIS_URL, 6379)
    return REDIS_URL


def require_amqp() -> str:
    require_service("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


def require_program(name: str) -> str:
    """The path of program ``name`` (skip on a laptop, fail under CI without it)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (for a server a test starts for itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def amqp_vhost() -> str:
    path = urlsplit(AMQP_URL).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q`` on this machine's RabbitMQ (skip without it, fail under CI)."""
    exe = require_program("rabbitmqctl")
    done = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        missing(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout
