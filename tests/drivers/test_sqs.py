"""What is specific to the SQS broker, on moto's server (results in DynamoDB Local): Go's queue
URLs and bodies, visibility heartbeats, ETA hops past SQS's 15 minutes, dead letters, FIFO rules,
and a SIGKILLed worker's messages finishing on another worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from machinery import Config, ConfigError, Server, SQSConfig, TaskFailed, UnsupportedOperation
from machinery._sync import run_sync
from machinery.brokers.sqs import SQSBroker, SQSConsumer, dead_queue_name
from support.configs import push_raw
from support.fixtures import unique
from support.harnesses.dynamodb import GROUPS_TABLE, STATES_TABLE
from support.harnesses.sqs import SQSHarness
from support.interop import INTEROP_DIR
from support.recording import Recorder
from support.scenarios import CLOUD_WAIT, doomed_worker, kill, read_started, register, run_seed_scenarios, sig
from support.waiting import wait_until
from support.workers import running_worker

pytestmark = [pytest.mark.sqs, pytest.mark.dynamodb]
MACHINERY = Path(sys.executable).with_name("machinery")


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> SQSHarness:
    harness = SQSHarness(request, tmp_path)
    harness.setup()
    return harness


@pytest.fixture
def queue() -> str:
    return unique("sqs_q")


def make_server(harness: SQSHarness, queue: str, **overrides: Any) -> Server:
    return Server(harness.config(queue, **overrides))


@pytest.fixture
def server(harness: SQSHarness, queue: str) -> Iterator[Server]:
    server = make_server(harness, queue)
    yield server
    run_sync(harness.cleanup(server, queue, []))
    server.close()


def test_seed_scenarios(server: Server) -> None:
    rec = Recorder()
    register(server, rec)
    run_seed_scenarios(server, rec)


def test_queue_url_and_body_are_gos(server: Server, harness: SQSHarness, queue: str) -> None:
    broker = harness.broker_of(server)
    assert broker.queue_url(queue) == f"{harness.url(queue)}/{queue}"  # broker URL + "/" + name
    server.send_task(sig("add", 1, 1))
    (body,) = run_sync(harness.queued_bodies(server, queue))
    go = json.loads((INTEROP_DIR / "amqp_task_add.json").read_text())
    ours = json.loads(body)
    assert list(ours) == list(go)  # the 19 keys, in Go's order: the body is the Signature JSON alone
    assert ours["Args"] == go["Args"] and ours["Name"] == "add"


def test_sigkilled_worker_messages_complete_on_another_worker(
    server: Server, harness: SQSHarness, queue: str, tmp_path: Path
) -> None:
    doomed = doomed_worker(tmp_path, harness.config(queue))
    try:
        results = [server.send_task(sig("slow", n)) for n in (1, 2)]
        read_started(doomed, 2)
        assert run_sync(harness.taken_count(server, queue)) == 2
    finally:
        kill(doomed)
    done = Recorder()

    @server.task("slow")
    def slow(n: int) -> int:
        done.add("slow", n)
        return n * 10

    # No one extends the dead worker's visibility: SQS hands its messages to this worker.
    with running_worker(server, concurrency=2):
        assert sorted(r.get(timeout=CLOUD_WAIT) for r in results) == [10, 20]
    assert sorted(done.of("slow")) == [(1,), (2,)]


def test_task_longer_than_the_visibility_timeout_runs_once(harness: SQSHarness, queue: str) -> None:
    server = make_server(harness, queue, sqs=SQSConfig(create_missing=True, visibility_timeout=2, wait_time_seconds=1))
    other = make_server(harness, queue, sqs=SQSConfig(create_missing=True, visibility_timeout=2, wait_time_seconds=1))
    rec = Recorder()
    for each in (server, other):

        @each.task("long")
        def long(n: int) -> int:
            rec.add("long", n)
            rec.gate.wait(30)
            return n

    try:
        with running_worker(server), running_worker(other):
            result = server.send_task(sig("long", 7))
            wait_until(lambda: rec.of("long"), CLOUD_WAIT, "the long task starting")
            # Three visibility timeouts pass while it runs: the heartbeat keeps it hidden.
            deadline = time.monotonic() + 6.5
            while time.monotonic() < deadline:
                assert len(rec.of("long")) == 1, "the message was redelivered while its task ran"
                time.sleep(0.1)
            rec.gate.set()
            assert result.get(timeout=CLOUD_WAIT) == 7
        assert rec.of("long") == [(7,)]
    finally:
        run_sync(harness.cleanup(server, queue, []))


def test_eta_beyond_the_hop_limit_runs_when_due_and_not_before(
    harness: SQSHarness, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SQSConfig(create_missing=True, visibility_timeout=4, wait_time_seconds=1, max_delay_seconds=2)
    server = make_server(harness, queue, sqs=config)
    rec = Recorder()
    register(server, rec)
    hops: list[float] = []
    delay_again = SQSConsumer._delay_again

    async def counting(self: SQSConsumer, body: bytes, handle: str, left: float) -> None:
        hops.append(left)
        await delay_again(self, body, handle, left)

    monkeypatch.setattr(SQSConsumer, "_delay_again", counting)
    delays: list[int] = []
    entry = SQSBroker._entry

    def recording(self: SQSBroker, queue: str, entry_id: str, body: bytes, delay: float) -> dict[str, Any]:
        made = entry(self, queue, entry_id, body, delay)
        delays.append(made.get("DelaySeconds", 0))
        return made

    monkeypatch.setattr(SQSBroker, "_entry", recording)
    try:
        with running_worker(server):
            assert server.send_task(sig("add", 0, 0)).get(timeout=CLOUD_WAIT) == 0  # queue, tables, clients ready
            eta = datetime.now(timezone.utc) + timedelta(seconds=7)
            result = server.send_task(sig("add", 3, 4, eta=eta))
            assert result.get(timeout=CLOUD_WAIT) == 7
        assert rec.times("add")[-1] >= eta.timestamp(), "the task ran before its ETA"
        # Sent with a 2 s delay and re-delayed each time it came early, never by more than 2 s.
        assert hops, "the message was never re-delayed"
        assert max(delays) == 2 and all(0 <= d <= 2 for d in delays), delays
    finally:
        run_sync(harness.cleanup(server, queue, []))


def test_undecodable_message_goes_to_the_dead_queue_with_its_reason(server: Server, queue: str) -> None:
    push_raw(server, b"this is not JSON")
    with running_worker(server):
        letters = wait_until(lambda: server.dead_letters(), CLOUD_WAIT, "a dead letter")
    assert [letter.body for letter in letters] == [b"this is not JSON"]
    assert "not JSON" in letters[0].reason
    assert server.get_pending_tasks() == []
    assert dead_queue_name(queue) == f"{queue}-dead" and dead_queue_name("q.fifo") == "q-dead.fifo"


def test_inspection(server: Server) -> None:
    sent = [server.send_task(sig("add", n, n)) for n in range(3)]
    assert [s.uuid for s in server.get_pending_tasks()] == [r.task_uuid for r in sent]
    assert len(server.get_pending_tasks()) == 3  # looking does not take them away
    with pytest.raises(UnsupportedOperation, match="SQS cannot list delayed"):
        server.get_delayed_tasks()


def test_fifo_queues_need_a_group_and_keep_retries(harness: SQSHarness) -> None:
    queue = unique("sqs_fifo") + ".fifo"
    server = make_server(harness, queue)
    rec = Recorder()
    register(server, rec)
    try:
        with pytest.raises(ConfigError, match="BrokerMessageGroupId"):
            server.send_task(sig("add", 1, 2))
        with running_worker(server):
            # The retries re-send the same UUID: deduplicated by body, not UUID, they are not lost.
            result = server.send_task(sig("flaky", "f", broker_message_group_id="g1"))
            assert result.get(timeout=CLOUD_WAIT) == "done"
        assert len(rec.of("flaky")) == 3
    finally:
        run_sync(harness.cleanup(server, queue, []))


def test_urls_follow_gos_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISABLE_STRICT_SQS_CHECK", raising=False)
    backend = "redis://127.0.0.1:6379/0"
    assert Config(broker="https://sqs.us-east-2.amazonaws.com/123456789012", result_backend=backend)
    with pytest.raises(ConfigError, match="DISABLE_STRICT_SQS_CHECK"):
        Config(broker="http://127.0.0.1:4566/123456789012", result_backend=backend)
    monkeypatch.setenv("DISABLE_STRICT_SQS_CHECK", "1")
    assert Config(broker="http://127.0.0.1:4566/123456789012", result_backend=backend)
    broker = SQSBroker(Config(broker="https://sqs.us-east-2.amazonaws.com/1234/", result_backend=backend), "")
    assert broker.queue_url("tasks") == "https://sqs.us-east-2.amazonaws.com/1234/tasks"
    assert broker.clients.region == "us-east-2" and broker.clients.endpoint_url is None


def test_a_missing_queue_is_one_clear_error(harness: SQSHarness, queue: str) -> None:
    server = make_server(harness, queue, sqs=SQSConfig(create_missing=False))
    with pytest.raises(ConfigError, match=f"SQS queue '{queue}' does not exist"):
        server.send_task(sig("add", 1, 1))


def test_an_unreachable_server_is_waited_out(harness: SQSHarness, queue: str) -> None:
    config = harness.config(queue)
    config.broker = "http://127.0.0.1:9/123456789012"  # nothing listens on the discard port
    server = Server(config)
    errors: list[BaseException] = []
    worker = server.new_worker()
    worker.set_error_handler(errors.append)
    thread = threading.Thread(target=worker.launch, daemon=True)
    thread.start()
    try:
        wait_until(lambda: errors, CLOUD_WAIT, "the worker reporting the outage")
        assert thread.is_alive(), "the worker gave up instead of retrying"
        assert "cannot reach SQS" in str(errors[0])
    finally:
        worker.quit()
        thread.join(30)


def cli_env(harness: SQSHarness, queue: str) -> dict[str, str]:
    """The environment a user on a local SQS and DynamoDB would set (the SDKs' own endpoint names)."""
    return {
        **os.environ,
        "BROKER": harness.url(queue),
        "RESULT_BACKEND": harness.results.url(queue),
        "DEFAULT_QUEUE": queue,
        "DISABLE_STRICT_SQS_CHECK": "1",
        "AWS_ENDPOINT_URL_DYNAMODB": harness.results.server.url,
        "TASK_STATES_TABLE": STATES_TABLE,
        "GROUP_METAS_TABLE": GROUPS_TABLE,
        "DYNAMODB_CREATE_TABLES": "1",
        "SQS_CREATE_MISSING": "1",
    }


@pytest.mark.slow
def test_demo_and_cli(harness: SQSHarness, queue: str, tmp_path: Path) -> None:
    env = cli_env(harness, queue)
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
    assert "Traceback" not in delayed.stderr


def test_missing_credentials_are_one_clear_error(
    harness: SQSHarness, queue: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup off loopback
    server = make_server(harness, queue)
    with pytest.raises(ConfigError, match="no AWS credentials"):
        server.send_task(sig("add", 1, 1))


def test_acks_of_one_moment_share_one_delete_batch(
    server: Server, harness: SQSHarness, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import machinery.brokers.sqs as sqs_module

    batches: list[int] = []
    delete = sqs_module.delete_messages

    async def counting(sqs: Any, url: str, handles: Any) -> None:
        batches.append(len(handles))
        await delete(sqs, url, handles)

    monkeypatch.setattr(sqs_module, "delete_messages", counting)
    for n in range(5):
        server.send_task(sig("add", n, n))

    async def take_and_ack() -> int:
        consumer = await server.broker.open_consumer(queue, "batch-test")
        taken: list[Any] = []
        while len(taken) < 5:
            taken += await consumer.fetch(5 - len(taken), timeout=1)
        await asyncio.gather(*(consumer.ack(d) for d in taken))  # five tasks finishing together
        await consumer.close()
        return len(taken)

    assert run_sync(take_and_ack()) == 5
    assert batches == [5]
    assert run_sync(harness.queued_bodies(server, queue)) == []


def test_stop_task_deletion_on_error_leaves_a_failed_message_for_redrive(harness: SQSHarness, queue: str) -> None:
    # Go's StopTaskDeletionOnError: the final failure is stored, but the message is not deleted:
    # it comes back after its visibility timeout (here 2 s) and runs again, each receive counted
    # toward the queue's redrive policy. A plain failure is deleted (the first send shows it).
    server = make_server(harness, queue, sqs=SQSConfig(create_missing=True, visibility_timeout=2, wait_time_seconds=1))
    rec = Recorder()
    register(server, rec)
    try:
        with running_worker(server):
            plain = server.send_task(sig("fail", "plain"))
            with pytest.raises(TaskFailed, match="plain"):
                plain.get(timeout=CLOUD_WAIT)
            kept = server.send_task(sig("fail", "kept", stop_task_deletion_on_error=True))
            with pytest.raises(TaskFailed, match="kept"):
                kept.get(timeout=CLOUD_WAIT)
            wait_until(lambda: len(rec.of("fail")) >= 3, CLOUD_WAIT, "the kept message running again")
        assert rec.of("fail").count(("plain",)) == 1, "a plain failure came back"
        assert all(args in {("plain",), ("kept",)} for args in rec.of("fail"))
        visible, in_flight, _delayed = run_sync(harness.broker_of(server).queue_counts(queue))
        assert visible + in_flight == 1, "the kept message left the queue"
    finally:
        run_sync(harness.cleanup(server, queue, []))
