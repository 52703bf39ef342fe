"""What is specific to the GCP Pub/Sub broker, on Google's emulator (results in Redis): Go's
topics and data, ack deadlines extended while a task runs, a SIGKILLed worker's messages
finishing on another worker, ETA held back by ack deadlines, dead letters, missing topics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from machinery import Config, ConfigError, GCPPubSubConfig, Server, UnsupportedOperation
from machinery._sync import run_sync
from support.configs import push_raw
from support.fixtures import unique
from support.harnesses.pubsub import TEST_ACK_DEADLINE, PubSubHarness
from support.interop import INTEROP_DIR
from support.recording import Recorder
from support.scenarios import CLOUD_WAIT, doomed_worker, kill, read_started, register, run_seed_scenarios, sig
from support.waiting import wait_until
from support.workers import running_worker

pytestmark = [pytest.mark.gcppubsub, pytest.mark.redis]
MACHINERY = Path(sys.executable).with_name("machinery")


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> PubSubHarness:
    harness = PubSubHarness(request, tmp_path)
    harness.setup()
    return harness


@pytest.fixture
def queue() -> str:
    return unique("ps-q")


@pytest.fixture
def server(harness: PubSubHarness, queue: str) -> Iterator[Server]:
    server = Server(harness.config(queue))
    yield server
    run_sync(harness.cleanup(server, queue, []))
    server.close()


def test_seed_scenarios(server: Server) -> None:
    rec = Recorder()
    register(server, rec)
    run_seed_scenarios(server, rec)


def test_topic_and_data_are_gos(server: Server, harness: PubSubHarness, queue: str) -> None:
    server.send_task(sig("add", 1, 1))
    broker = harness.broker_of(server)

    async def pulled() -> list[Any]:
        return await broker._peek(queue, await broker.ensure_subscription(queue))

    (message,) = run_sync(pulled())
    assert dict(message.message.attributes) == {}  # the Signature JSON alone, as Go publishes
    go = json.loads((INTEROP_DIR / "amqp_task_add.json").read_text())
    ours = json.loads(bytes(message.message.data))
    assert list(ours) == list(go) and ours["RoutingKey"] == queue  # topic = routing key = default queue
    assert broker.subscription_for(queue) == f"{queue}-sub"  # the URL's subscription


def test_sigkilled_worker_messages_complete_on_another_worker(
    server: Server, harness: PubSubHarness, queue: str, tmp_path: Path
) -> None:
    doomed = doomed_worker(tmp_path, harness.config(queue))
    try:
        results = [server.send_task(sig("slow", n)) for n in (1, 2)]
        read_started(doomed, 2)
    finally:
        kill(doomed)
    done = Recorder()

    @server.task("slow")
    def slow(n: int) -> int:
        done.add("slow", n)
        return n * 10

    # The dead worker's deadlines lapse (10 s) and the emulator hands the messages over.
    with running_worker(server, concurrency=2):
        assert sorted(r.get(timeout=CLOUD_WAIT) for r in results) == [10, 20]
    assert sorted(done.of("slow")) == [(1,), (2,)]


@pytest.mark.slow
def test_task_longer_than_the_ack_deadline_runs_once(harness: PubSubHarness, queue: str) -> None:
    server, other = Server(harness.config(queue)), Server(harness.config(queue))
    rec = Recorder()
    for each in (server, other):

        @each.task("long")
        def long(n: int) -> int:
            rec.add("long", n)
            rec.gate.wait(60)
            return n

    try:
        with running_worker(server), running_worker(other):
            result = server.send_task(sig("long", 7))
            wait_until(lambda: rec.of("long"), CLOUD_WAIT, "the long task starting")
            deadline = time.monotonic() + 2.5 * TEST_ACK_DEADLINE
            while time.monotonic() < deadline:  # two and a half ack deadlines pass while it runs
                assert len(rec.of("long")) == 1, "the message was redelivered while its task ran"
                time.sleep(0.2)
            rec.gate.set()
            assert result.get(timeout=CLOUD_WAIT) == 7
        assert rec.of("long") == [(7,)]
    finally:
        run_sync(harness.cleanup(server, queue, []))


def test_eta_is_held_back_until_due(server: Server) -> None:
    rec = Recorder()
    register(server, rec)
    with running_worker(server):
        eta = datetime.now(timezone.utc) + timedelta(seconds=4)
        assert server.send_task(sig("add", 3, 4, eta=eta)).get(timeout=CLOUD_WAIT) == 7
    assert rec.times("add")[0] >= eta.timestamp()


def test_undecodable_message_is_dead_lettered_with_its_reason_not_run(
    server: Server, harness: PubSubHarness, queue: str
) -> None:
    push_raw(server, b'{"Name": "add", "Args": "not a list"}')
    rec = Recorder()
    register(server, rec)
    with running_worker(server):
        letters = wait_until(lambda: server.dead_letters(), CLOUD_WAIT, "a dead letter")
    assert letters[0].body == b'{"Name": "add", "Args": "not a list"}' and letters[0].reason
    assert rec.of("add") == []  # Go runs such a message although it nacks it; we do not
    assert server.get_pending_tasks() == []
    assert server.requeue_dead() == 1
    assert run_sync(harness.queued_bodies(server, queue)) == [b'{"Name": "add", "Args": "not a list"}']
    assert server.dead_letters() == []


def test_inspection(server: Server) -> None:
    sent = [server.send_task(sig("add", n, n)) for n in range(3)]
    assert sorted(s.uuid for s in server.get_pending_tasks()) == sorted(r.task_uuid for r in sent)
    assert len(server.get_pending_tasks()) == 3  # looking nacks them back
    with pytest.raises(UnsupportedOperation, match="Pub/Sub cannot list delayed"):
        server.get_delayed_tasks()


def test_missing_topic_is_one_clear_error(harness: PubSubHarness, queue: str) -> None:
    config: Config = harness.config(queue, gcppubsub=GCPPubSubConfig(create_missing=False))
    server = Server(config)
    with pytest.raises(ConfigError, match="does not exist: create it"):
        server.send_task(sig("add", 1, 1))
    server.close()


def test_url_form() -> None:
    with pytest.raises(ConfigError, match="gcppubsub://PROJECT/SUBSCRIPTION"):
        Config(broker="gcppubsub://only-project", result_backend="redis://127.0.0.1:6379/0")


@pytest.mark.slow
def test_demo_and_cli(harness: PubSubHarness, queue: str, tmp_path: Path) -> None:
    env = {**os.environ, "BROKER": harness.url(queue), "RESULT_BACKEND": harness.redis_url, "DEFAULT_QUEUE": queue}
    demo = subprocess.run(
        [str(MACHINERY), "demo", "--broker", env["BROKER"], "--backend", env["RESULT_BACKEND"]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "= 48" in demo.stdout and "= 20" in demo.stdout  # the chain and the chord
    delayed = subprocess.run(
        [str(MACHINERY), "delayed"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert delayed.returncode != 0 and "not available on this broker" in delayed.stderr + delayed.stdout
