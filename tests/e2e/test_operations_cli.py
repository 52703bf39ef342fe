"""The operations commands: inspect, purge, dead --purge, ping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from machinery import Config, Server, Signature
from machinery.cli import main
from support.configs import push_raw
from support.waiting import wait_until
from support.workers import running_worker

QUEUE = "ops_cli_q"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"BROKER": f"sqlite:///{tmp_path / 'ops.db'}", "DEFAULT_QUEUE": QUEUE}


@pytest.fixture
def server(env: dict[str, str]) -> Server:
    made = Server(Config(broker=env["BROKER"], default_queue=QUEUE))
    gate = threading.Event()

    @made.task(name="hold")
    def hold() -> None:
        gate.wait(30)

    made.gate = gate  # type: ignore[attr-defined]
    return made


def invoke(args: list[str], env: dict[str, str], given: str | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, input=given, prog_name="machinery")


@pytest.fixture
def held(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.gate.set()  # type: ignore[attr-defined]


def test_inspect_lists_live_workers_and_what_they_run(held: Server, env: dict[str, str]) -> None:
    held.get_pending_tasks()  # the database exists (a read-only command refuses to create it)
    assert "No live workers" in invoke(["inspect"], env).output
    with running_worker(held, concurrency=2, consumer_tag="ops-worker") as worker:
        result = held.send_task(Signature("hold"))
        output = wait_until(
            lambda: result.task_uuid in (out := invoke(["inspect"], env).output) and out,
            timeout=30,
            what="inspect showing the running task",
        )
        held.gate.set()  # type: ignore[attr-defined]
        result.get(timeout=10)
    assert "ops-worker" in output and worker.queue in output
    assert "1/2" in output and "hold" in output
    assert "1 worker alive, 1 task running" in output


def test_purge_asks_first_and_deletes_the_waiting_tasks(server: Server, env: dict[str, str]) -> None:
    for _ in range(3):
        server.send_task(Signature("hold"))
    refused = invoke(["purge", QUEUE], env, given="n\n")
    assert refused.exit_code == 1 and "Delete 3 tasks waiting in ops_cli_q?" in refused.output
    assert len(server.get_pending_tasks()) == 3
    done = invoke(["purge", QUEUE, "--yes"], env)
    assert done.exit_code == 0 and "Purged 3 tasks from ops_cli_q" in done.output
    assert server.get_pending_tasks() == []
    assert "ops_cli_q is empty" in invoke(["purge", QUEUE], env).output


def test_dead_purge_deletes_the_dead_letters(held: Server, env: dict[str, str]) -> None:
    push_raw(held, b"junk one", b"junk two")
    with running_worker(held):
        wait_until(lambda: len(held.dead_letters(QUEUE)) == 2, timeout=30, what="two dead letters")
    confirmed = invoke(["dead", "--purge"], env, given="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "Delete 2 dead letters of ops_cli_q?" in confirmed.output
    assert "Purged 2 dead letters from ops_cli_q" in confirmed.output
    assert held.dead_letters(QUEUE) == []
    assert "No dead letters in ops_cli_q" in invoke(["dead", "--purge", "--yes"], env).output


def test_ping_exits_0_when_both_answer_and_1_when_not(env: dict[str, str], server: Server) -> None:
    ok = invoke(["ping"], env)
    assert ok.exit_code == 0, ok.output
    assert ok.output.count(": ok in ") == 2
    down = invoke(["ping"], {"BROKER": "redis://127.0.0.1:1/0", "RESULT_BACKEND": env["BROKER"]})
    assert down.exit_code == 1
    assert "broker   redis://127.0.0.1:1/0: no answer" in down.output
    assert "backend" in down.output and ": ok in " in down.output
