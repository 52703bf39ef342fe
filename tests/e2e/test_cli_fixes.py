"""The CLI as a new user meets it: waiting has a limit and says when nobody runs the task,
reading creates nothing, and a broker that cannot answer says so."""

from __future__ import annotations

import importlib
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from machinery import Config, Server
from machinery.cli import sending
from support.cli import assert_one_line_error, invoke
from support.services import AMQP_URL, require_service
from support.workers import running_worker


@pytest.fixture
def memory_env() -> dict[str, str]:
    return {"BROKER": f"memory://cli_{uuid.uuid4().hex[:8]}", "DEFAULT_QUEUE": "cli_q"}


def test_send_wait_has_a_default_timeout_and_says_nobody_runs_the_task(
    memory_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sending, "WAIT_TIMEOUT", 0.5)  # the real default is 60 s
    result = invoke(["send", "add", "1", "1", "--wait"], memory_env)
    assert result.exit_code == 2, result.output
    warning, error = result.stderr.strip().splitlines()
    assert warning == (
        "Warning: no live worker runs 'add' from 'cli_q' (no worker consumes it); waiting anyway "
        "(start one with: machinery worker -A module:server)"
    )
    assert error.startswith("Error: no result within 0.5 s:") and "is PENDING" in error


def test_timeout_zero_waits_without_a_limit(memory_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sending, "WAIT_TIMEOUT", 0.0001)  # so that only "no limit" can let it finish
    server = Server(Config(broker=memory_env["BROKER"], default_queue=memory_env["DEFAULT_QUEUE"]))
    server.register_task("add", lambda *args: sum(args))
    with running_worker(server):
        result = invoke(["send", "add", "1", "1", "--timeout", "0"], memory_env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1] == "2"
    assert "0 waits forever" in " ".join(invoke(["send", "--help"]).output.split())


@pytest.mark.parametrize("command", [["pending"], ["status", "task_x"], ["delayed"], ["dead"]])
def test_read_only_commands_create_no_database(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(command)
    assert_one_line_error(result, f"no SQLite database at {tmp_path / 'machinery.db'}", "nothing has been sent")
    assert list(tmp_path.iterdir()) == []


def test_delayed_on_rabbitmq_says_it_is_not_available() -> None:
    require_service("RabbitMQ", AMQP_URL, 5672)
    result = invoke(["delayed"], {"BROKER": AMQP_URL, "RESULT_BACKEND": f"memory://cli_{id(AMQP_URL)}"})
    assert_one_line_error(result, "not available on this broker", "one queue per delay", "rabbitmqctl list_queues")


def test_the_demo_on_rabbitmq_leaves_no_queue_that_collects_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("RabbitMQ", AMQP_URL, 5672)
    demo = importlib.import_module("machinery.cli.demo")  # (machinery.cli.demo is also the command's name)

    queues: list[str] = []
    original = demo._clean_up

    async def watching(server: Server, queue: str, states: Any) -> None:
        queues.append(queue)
        await original(server, queue, states)

    monkeypatch.setattr(demo, "_clean_up", watching)
    assert demo.run_demo(AMQP_URL)
    (queue,) = queues
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    # Only delay queues may remain: they expire by themselves (twice their delay).
    left = [name for name in listed if queue in name]
    assert all(name.startswith("delay.") for name in left), left
