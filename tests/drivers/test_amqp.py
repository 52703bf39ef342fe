"""RabbitMQ: the AMQP broker and result backend against the server on this machine (docs/wire.md §10, 11.2).

Every test uses its own exchange, queues and binding key (``mt_<hex>_...``), so tests never see
each other, and removes them afterwards; result queues expire on their own. Topology checks
read RabbitMQ's own view with ``rabbitmqctl`` (flags, arguments and their AMQP integer types)
and compare it with the captures a real Go Machinery run left in ``tests/interop/captures``. Cutting
connections closes only this test process's own connections (found by the connection name
machinery gives them), never RabbitMQ itself.

Nothing here asserts how long anything took; waits are bounded so a broken broker fails the
test instead of hanging it.

What every broker and backend must do is in tests/contract/; this file keeps what is RabbitMQ's
own: Go's topology and envelope, the state stream, prefetch, failover, TLS and cut connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import aio_pika
import pytest
from aiormq import spec
from aiormq.abc import DeliveredMessage

from machinery import (
    FAILURE,
    PENDING,
    STARTED,
    SUCCESS,
    AMQPConfig,
    Config,
    GroupMeta,
    RedisConfig,
    RetryTaskLater,
    Server,
    Signature,
    TaskFailed,
    TaskState,
    UnsupportedOperation,
)
from machinery._drivers.amqp import AMQPConnector, AMQPInt32, AMQPInt64
from machinery._sync import run_sync
from machinery.backends.amqp import AMQPBackend, chord_triggered_queue
from machinery.brokers.amqp import REASON_HEADER, dead_letter_queue
from machinery.errors import BrokerConnectionError
from support.interop import INTEROP_DIR
from support.recording import Recorder, register_seed_tasks
from support.services import AMQP_URL, REDIS_URL, rabbitmqctl, require_service
from support.services import amqp_vhost as vhost
from support.waiting import wait_until
from support.workers import running_worker

pytestmark = pytest.mark.amqp

WAIT = 30.0  # an upper bound for anything to happen; never an expectation of speed
RESULTS_TTL = 180


# --------------------------------------------------------------------------- helpers


def amqp_config(prefix: str, backend_url: str | None = None, results_ttl: int = RESULTS_TTL, **amqp: Any) -> Config:
    """A config whose exchange, binding key and queue are this test's own."""
    options: dict[str, Any] = {"exchange": f"{prefix}_ex", "binding_key": f"{prefix}_key", **amqp}
    return Config(
        broker=AMQP_URL,
        result_backend=backend_url or AMQP_URL,
        default_queue=f"{prefix}_q",
        results_expire_in=results_ttl,
        amqp=AMQPConfig(**options),
        redis=RedisConfig(normal_tasks_poll_period=200, delayed_tasks_poll_period=100),
    )


def list_queues(*names: str) -> dict[str, tuple[bool, bool, dict[str, Any]]]:
    """name -> (durable, auto_delete, arguments) as ``rabbitmqctl list_queues`` shows them."""
    out = rabbitmqctl("list_queues", "-p", vhost(), "name", "durable", "auto_delete", "arguments")
    found = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] in names:
            found[parts[0]] = (parts[1] == "true", parts[2] == "true", parse_arguments(parts[3]))
    return found


def parse_arguments(text: str) -> dict[str, Any]:
    """``[{"x-message-ttl",3600000},{"x-dead-letter-exchange","ex"}]`` -> a dict."""
    pairs = re.findall(r'\{"([^"]+)",("[^"]*"|-?\d+)\}', text)
    return {key: (value.strip('"') if value.startswith('"') else int(value)) for key, value in pairs}


def argument_types(queue: str) -> dict[str, str]:
    """The AMQP field types RabbitMQ stored for a queue's arguments (``signedint``, ``long``...)."""
    expression = (
        f'[[{{K, T}} || {{K, T, _}} <- amqqueue:get_arguments(Q)] || Q <- rabbit_amqqueue:list(<<"{vhost()}">>), '
        f'amqqueue:get_name(Q) =:= {{resource, <<"{vhost()}">>, queue, <<"{queue}">>}}].'
    )
    out = rabbitmqctl("eval", expression)
    return dict(re.findall(r'\{<<"([^"]+)">>,(\w+)\}', out))


def list_bindings(exchange: str) -> set[tuple[str, str]]:
    """(queue, routing key) bound to ``exchange``."""
    out = rabbitmqctl("list_bindings", "-p", vhost(), "source_name", "destination_name", "routing_key")
    found = set()
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == exchange:
            found.add((parts[1], parts[2]))
    return found


def own_connections(pid: int | None = None) -> list[str]:
    """RabbitMQ's ids of the connections machinery opened in process ``pid`` (by their name)."""
    marker = f"pid={pid or os.getpid()} "
    out = rabbitmqctl("list_connections", "-p", vhost(), "pid", "client_properties")
    return [line.split("\t", 1)[0] for line in out.splitlines() if marker in line]


def close_connections(targets: list[str]) -> None:
    """Close these connections server-side, all at once (``rabbitmqctl close_connection``)."""
    exe = shutil.which("rabbitmqctl")
    assert exe is not None
    running = [
        subprocess.Popen([exe, "-q", "close_connection", target, "test: cut"], stdout=subprocess.DEVNULL)
        for target in targets
    ]
    for proc in running:
        proc.wait(60)


def capture(name: str) -> str:
    path = INTEROP_DIR / name
    if not path.exists():
        pytest.skip(f"interop capture {path} is missing")
    return path.read_text()


def parse_capture_queues(text: str) -> dict[str, tuple[bool, bool, dict[str, Any]]]:
    queues: dict[str, tuple[bool, bool, dict[str, Any]]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith(("QUEUES", "EXCHANGES", "BINDINGS")):
            section = line.split()[0]
            continue
        parts = line.split("\t")
        if section == "QUEUES" and len(parts) >= 4 and parts[0] != "name":
            queues[parts[0]] = (parts[1] == "true", parts[2] == "true", parse_arguments(parts[3]))
    return queues


def parse_capture_bindings(text: str, exchange: str) -> set[tuple[str, str]]:
    found, section = set(), ""
    for line in text.splitlines():
        if line.startswith(("QUEUES", "EXCHANGES", "BINDINGS")):
            section = line.split()[0]
            continue
        parts = line.split("\t")
        if section == "BINDINGS" and len(parts) >= 3 and parts[0] == exchange:
            found.add((parts[1], parts[2]))
    return found


async def _raw(coro_fn: Callable[[aio_pika.abc.AbstractChannel], Any]) -> Any:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        return await coro_fn(channel)
    finally:
        await connection.close()


def raw(coro_fn: Callable[[aio_pika.abc.AbstractChannel], Any]) -> Any:
    """Run ``coro_fn(channel)`` on a plain aio-pika connection of its own (like a foreign client)."""
    return asyncio.run(_raw(coro_fn))


def peek(queue: str) -> list[DeliveredMessage]:
    """The messages in ``queue`` exactly as delivered (taken without ack, returned on close).

    Raw aiormq messages, because aio-pika reports an absent priority as 0 and absent headers
    as ``{}``, and the point is to see what is (not) on the wire.
    """

    async def run(channel: aio_pika.abc.AbstractChannel) -> list[DeliveredMessage]:
        underlay = await channel.get_underlay_channel()
        await underlay.queue_declare(queue, passive=True)
        taken = []
        while not isinstance((m := await underlay.basic_get(queue, no_ack=False)).delivery, spec.Basic.GetEmpty):
            taken.append(m)
        return taken

    return list(raw(run))


def message_count(queue: str) -> int:
    async def run(channel: aio_pika.abc.AbstractChannel) -> int:
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)

    return int(raw(run))


def publish_raw(exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None) -> None:
    """Publish bytes as a foreign (Go) client would: persistent JSON, nothing of ours involved."""

    async def run(channel: aio_pika.abc.AbstractChannel) -> None:
        ex = await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
        await ex.publish(
            aio_pika.Message(body, content_type="application/json", delivery_mode=2, headers=headers),
            routing_key,
        )

    raw(run)


def cleanup(prefix: str, extra_queues: list[str]) -> None:
    """Delete what a test declared with ``prefix`` (queues and exchange); result queues expire."""

    async def run(channel: aio_pika.abc.AbstractChannel) -> None:
        underlay = await channel.get_underlay_channel()
        for name in [
            f"{prefix}_q",
            f"{prefix}_key",
            dead_letter_queue(f"{prefix}_q"),
            f"{prefix}_delayed",
            f"{prefix}_other",
            *extra_queues,
        ]:
            await underlay.queue_delete(name)
        await underlay.exchange_delete(f"{prefix}_ex")

    try:
        raw(run)
    except Exception as exc:  # cleanup must never hide the test's own outcome
        print(f"cleanup of {prefix}: {exc}")


@pytest.fixture
def prefix(amqp_url: str) -> Iterator[str]:
    name = f"mt_{uuid.uuid4().hex[:10]}"
    extra: list[str] = []
    yield name
    cleanup(name, extra)


@pytest.fixture(params=["amqp", "redis"])
def backend(request: pytest.FixtureRequest, amqp_url: str) -> str:
    """The result backend beside the AMQP broker: AMQP itself, or Redis."""
    if request.param == "redis":
        require_service("Redis", REDIS_URL, 6379)
        pytest.importorskip("machinery.backends.redis")
        return REDIS_URL
    return amqp_url


def make_server(
    prefix: str, backend_url: str | None = None, results_ttl: int = RESULTS_TTL, **amqp: Any
) -> tuple[Server, Recorder]:
    server = Server(amqp_config(prefix, backend_url, results_ttl, **amqp))
    rec = Recorder()
    attempts: Counter[str] = Counter()

    register_seed_tasks(server, rec)

    @server.task
    def error_task(message: str) -> None:
        rec.add("error_task", message)
        raise ValueError(message)

    @server.task
    def later(key: str) -> str:
        attempts[key] += 1
        rec.add("later", key)
        if attempts[key] == 1:
            raise RetryTaskLater("not yet", 0.5)
        return "retried ok"

    return server, rec


def declare_worker_queue(server: Server) -> None:
    """Have the workers' queue exist, as in any deployment where a worker has ever run.

    (With Go's topology a task published before that only reaches the publisher-side queue.)
    """

    async def run() -> None:
        consumer = await server.broker.open_consumer(server.config.default_queue, "setup", prefetch=1)
        await consumer.close()

    run_sync(run())


@pytest.fixture
def env(prefix: str, backend: str) -> Iterator[tuple[Server, Recorder]]:
    server, rec = make_server(prefix, backend)
    declare_worker_queue(server)
    yield server, rec
    server.close()


# --------------------------------------------------------------------------- core scenarios


def test_listing_delayed_tasks_says_it_is_not_available(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    with pytest.raises(UnsupportedOperation, match="one queue per delay"):  # never a wrong answer
        server.get_delayed_tasks()


def test_unregistered_task_with_the_ignore_flag_is_dropped(env: tuple[Server, Recorder]) -> None:
    server, _ = env
    body = capture("amqp_task_ignore_when_unregistered.json").strip()
    body = body.replace("task_fbeb4c1e-87c5-41ee-ad26-9db0520f0d6c", f"task_{uuid.uuid4()}")
    amqp = server.config.amqp
    with running_worker(server, concurrency=2):
        publish_raw(amqp.exchange, amqp.binding_key, body.encode())
        assert server.send_task(Signature("add", [2, 2])).get(timeout=WAIT) == 4
        wait_until(lambda: message_count(server.config.default_queue) == 0, timeout=WAIT, what="the queue emptying")
    assert server.get_pending_tasks() == []
    assert server.dead_letters() == []


def test_bad_bodies_are_dead_lettered_with_the_reason_and_the_consumer_goes_on(
    env: tuple[Server, Recorder],
) -> None:
    server, _ = env
    queue = server.config.default_queue
    with running_worker(server, concurrency=2):
        publish_raw("", queue, b"")
        publish_raw("", queue, b"{not json")
        wait_until(lambda: len(server.dead_letters()) == 2, timeout=WAIT, what="two dead letters")
        assert server.send_task(Signature("add", [3, 4])).get(timeout=WAIT) == 7  # still consuming
    letters = server.dead_letters()
    assert sorted(letter.body for letter in letters) == [b"", b"{not json"]
    assert all(letter.reason and letter.queue == queue for letter in letters)
    raw_letters = peek(dead_letter_queue(queue))
    assert all((m.header.properties.headers or {}).get(REASON_HEADER) for m in raw_letters)
    assert server.dead_letters() == letters  # inspecting leaves them in place
    assert server.requeue_dead() == 2
    assert message_count(queue) == 2 and message_count(dead_letter_queue(queue)) == 0


def test_pending_tasks_keep_their_order(env: tuple[Server, Recorder]) -> None:
    server, rec = env
    sent = [server.send_task(Signature("add", [i])) for i in range(6)]
    first = server.get_pending_tasks()
    second = server.get_pending_tasks()
    assert [s.uuid for s in first] == [r.task_uuid for r in sent]
    assert [s.uuid for s in second] == [r.task_uuid for r in sent]
    with running_worker(server, concurrency=1):
        for result in sent:
            result.get(timeout=WAIT)
    assert rec.of("add") == [(i,) for i in range(6)]  # delivered in the original order


def test_prefetch_never_exceeds_the_worker_concurrency(prefix: str, amqp_url: str) -> None:
    gate = threading.Event()
    server = Server(amqp_config(prefix, prefetch_count=0))
    running = Counter[str]()

    @server.task
    def hold(i: int) -> int:
        running["now"] += 1
        assert gate.wait(WAIT)
        return i

    try:
        declare_worker_queue(server)
        for i in range(5):
            server.send_task(Signature("hold", [i]))
        with running_worker(server, concurrency=2):
            wait_until(lambda: running["now"] == 2, timeout=WAIT, what="two tasks running")
            # RabbitMQ pushes up to the prefetch at once: had it been more, the queue would be empty by now.
            assert message_count(server.config.default_queue) == 3  # the rest stay in RabbitMQ
            gate.set()
    finally:
        gate.set()
        server.close()


def test_broker_urls_fail_over_in_order(prefix: str, amqp_url: str) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens there
    base = amqp_config(prefix)
    config = Config(
        broker=f"{dead}|{AMQP_URL}",
        multiple_broker_separator="|",
        result_backend=f"{dead}|{AMQP_URL}",
        default_queue=base.default_queue,
        results_expire_in=RESULTS_TTL,
        amqp=base.amqp,
    )
    server = Server(config)

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    try:
        declare_worker_queue(server)
        with running_worker(server, concurrency=1):
            assert server.send_task(Signature("add", [20, 22])).get(timeout=WAIT) == 42
    finally:
        server.close()


def test_amqps_urls_speak_tls() -> None:
    # RabbitMQ here has no TLS listener: the TLS handshake against its plain port must fail,
    # which shows an amqps:// URL is not silently used in the clear.
    url = AMQP_URL.replace("amqp://", "amqps://", 1)
    connector = AMQPConnector([url], role="test")
    with pytest.raises(BrokerConnectionError) as failure:
        run_sync(connector.open_connection("tls"))
    assert "amqps://" in str(failure.value) and ":***@" in str(failure.value)


def test_topic_exchange_routes_by_the_default_queue(prefix: str, amqp_url: str) -> None:
    # Go: for a non-direct exchange the routing key is the default queue, and the publisher
    # declares that queue bound with the binding key (here the same name, as Go users set it).
    server, _ = make_server(prefix, exchange_type="topic", binding_key=f"{prefix}_q")
    try:
        result = server.send_task(Signature("add", [2, 3]))  # before any worker: the queue exists
        assert [s.routing_key for s in server.get_pending_tasks()] == [f"{prefix}_q"]
        with running_worker(server, concurrency=1):
            assert result.get(timeout=WAIT) == 5
    finally:
        server.close()


# --------------------------------------------------------------------------- wire: topology and messages


def test_topology_matches_the_go_capture(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix, results_ttl=3600)
    amqp = server.config.amqp
    queue, key, exchange = server.config.default_queue, amqp.binding_key, amqp.exchange
    try:
        with running_worker(server, concurrency=1):
            pass  # the worker declares its queue, then stops (as in the capture: no consumer)
        result = server.send_task(Signature("add", [1, 1]))
        eta_result = server.send_task(
            Signature("add", [10, 20], eta=datetime.now(timezone.utc) + timedelta(seconds=30))
        )
        text = capture("amqp_topology_add_before_worker.txt")
        go_queues = parse_capture_queues(text)
        go_state = next(n for n in go_queues if n.startswith("task_"))
        renames = {"machinery_task": key, "machinery_tasks": queue, go_state: result.task_uuid}
        ours = list_queues(*renames.values())
        assert ours == {renames[name]: spec for name, spec in go_queues.items()}
        go_bindings = parse_capture_bindings(text, "machinery_exchange")
        expected_bindings = {(renames[q], renames.get(k, k)) for q, k in go_bindings}
        bindings = list_bindings(exchange)
        assert expected_bindings <= bindings
        assert argument_types(result.task_uuid) == {"x-message-ttl": "signedint", "x-expires": "signedint"}  # int32

        exchanges = rabbitmqctl("list_exchanges", "-p", vhost(), "name", "type", "durable", "auto_delete", "arguments")
        go_exchange = re.search(r"^machinery_exchange\t(.*)$", capture("amqp_topology_add_before_worker.txt"), re.M)
        assert go_exchange is not None
        assert f"{exchange}\t{go_exchange.group(1)}" in exchanges.splitlines()

        # The delay queue of the ETA task (capture: delay.2991.machinery_exchange.machinery_task).
        go_eta = parse_capture_queues(capture("amqp_topology_eta_before_worker.txt"))
        go_delay_name = next(n for n in go_eta if n.startswith("delay."))
        go_flags = go_eta[go_delay_name][:2]
        go_ms = int(go_delay_name.split(".")[1])
        delay_names = [q for q, _ in list_bindings(exchange) if q.startswith("delay.")]
        assert len(delay_names) == 1 and re.fullmatch(rf"delay\.\d+\.{exchange}\.{key}", delay_names[0])
        ms = int(delay_names[0].split(".")[1])
        durable, auto_delete, arguments = list_queues(delay_names[0])[delay_names[0]]
        assert (durable, auto_delete) == go_flags
        expected: dict[str, Any] = {}
        for name, value in go_eta[go_delay_name][2].items():
            if isinstance(value, str):
                expected[name] = value.replace("machinery_exchange", exchange).replace("machinery_task", key)
            else:  # x-message-ttl is the delay, x-expires twice that
                expected[name] = ms if value == go_ms else 2 * ms
        assert arguments == expected
        assert argument_types(delay_names[0]) == {
            "x-dead-letter-exchange": "longstr",
            "x-dead-letter-routing-key": "longstr",
            "x-message-ttl": "long",
            "x-expires": "long",  # int64, as Go sends them
        }
        run_sync(server.broker.close())
        cleanup(prefix, [result.task_uuid, eta_result.task_uuid, delay_names[0]])
    finally:
        server.close()


def test_message_properties_match_the_go_envelope(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix)
    amqp = server.config.amqp
    try:
        plain = server.send_task(Signature("add", [1, 1]))
        fancy = server.send_task(Signature("add", [1, 2], priority=5, headers={"trace": "x"}))
        delayed = server.send_task(Signature("add", [3], eta=datetime.now(timezone.utc) + timedelta(seconds=30)))
        messages = peek(amqp.binding_key)  # Go's publisher-side queue holds the copies
        by_uuid = {json.loads(m.body)["UUID"]: m for m in messages}
        go = json.loads(capture("amqp_task_add_envelope.json"))
        m = by_uuid[plain.task_uuid]
        p = m.header.properties
        assert {
            "exchange": (m.delivery.exchange or "").replace(amqp.exchange, "machinery_exchange"),
            "routing_key": (m.delivery.routing_key or "").replace(amqp.binding_key, "machinery_task"),
            "content_type": p.content_type,
            "delivery_mode": p.delivery_mode,
            "priority": p.priority,
            "expiration": p.expiration,
            "headers": p.headers,
        } == {k: v for k, v in go.items() if k != "body"}
        assert list(json.loads(m.body)) == list(json.loads(go["body"]))  # Go's 19 keys in Go's order
        # No timestamp, correlation id, reply-to, type, app id or user id either. (aiormq stamps a
        # random message id on every publish to pair returns with confirms; Go readers ignore it.)
        assert (p.timestamp, p.correlation_id, p.reply_to, p.message_type, p.app_id, p.user_id) == (None,) * 6
        f = by_uuid[fancy.task_uuid].header.properties
        assert (f.priority, f.headers) == (5, {"trace": "x"})

        go_eta = json.loads(capture("amqp_task_eta_envelope.json"))
        delay_queue = next(q for q, _ in list_bindings(amqp.exchange) if q.startswith("delay."))
        d = peek(delay_queue)[0]
        assert json.loads(d.body)["UUID"] == delayed.task_uuid
        assert d.delivery.routing_key == delay_queue and d.delivery.exchange == amqp.exchange
        dp = d.header.properties
        assert (dp.content_type, dp.delivery_mode, dp.priority, dp.expiration, dp.headers) == (
            go_eta["content_type"],
            go_eta["delivery_mode"],
            go_eta["priority"],
            go_eta["expiration"],
            go_eta["headers"],
        )
        cleanup(prefix, [delay_queue])
    finally:
        server.close()


def test_amqp_integer_widths_on_the_wire() -> None:
    import pamqp.encode

    assert pamqp.encode.field_table({"a": AMQPInt32(5)})[4:] == b"\x01aI\x00\x00\x00\x05"
    assert pamqp.encode.field_table({"a": AMQPInt64(5)})[4:] == b"\x01al" + (5).to_bytes(8, "big")
    assert pamqp.encode.field_table({"a": 5})[4:] == b"\x01ab\x05"  # everyone else's ints untouched


def test_skip_publisher_queue_switch(prefix: str, amqp_url: str) -> None:
    quirk, _ = make_server(prefix)
    clean, _ = make_server(prefix, skip_publisher_queue=True)
    queue, key = quirk.config.default_queue, quirk.config.amqp.binding_key
    try:
        # Python-only mode: a task sent before any worker ever ran waits in the workers' queue.
        early = clean.send_task(Signature("add", [1]))
        assert [s.uuid for s in clean.get_pending_tasks()] == [early.task_uuid]
        assert key not in list_queues(queue, key)
        # Go-compatible default: the publisher declares and fills a queue named after the key.
        quirky = quirk.send_task(Signature("add", [2]))
        assert [json.loads(m.body)["UUID"] for m in peek(key)] == [quirky.task_uuid]
        assert [s.uuid for s in quirk.get_pending_tasks()] == [early.task_uuid, quirky.task_uuid]
    finally:
        quirk.close()
        clean.close()


def test_delayed_queue_variant(prefix: str, amqp_url: str) -> None:
    server, rec = make_server(prefix, delayed_queue=f"{prefix}_delayed")
    try:
        with running_worker(server, concurrency=2):
            eta = datetime.now(timezone.utc) + timedelta(seconds=1)
            result = server.send_task(Signature("add", [4, 5], eta=eta))
            arguments = list_queues(f"{prefix}_delayed")[f"{prefix}_delayed"][2]
            assert arguments == {
                "x-dead-letter-exchange": server.config.amqp.exchange,
                "x-dead-letter-routing-key": server.config.amqp.binding_key,
            }
            assert result.get(timeout=WAIT) == 9
        assert rec.times("add")[0] >= eta.timestamp() - 0.05
    finally:
        server.close()


# --------------------------------------------------------------------------- result backend (docs/wire.md §11.2)


def test_state_stream_matches_the_go_capture_and_reads_leave_the_latest(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix)
    try:
        with running_worker(server, concurrency=1):
            result = server.send_task(Signature("add", [1, 1]))
            # No reads meanwhile.
            wait_until(lambda: message_count(result.task_uuid) == 4, timeout=WAIT, what="four states")
        go = [json.loads(line) for line in capture("amqp_backend_states_add.jsonl").splitlines()]
        ours = [json.loads(m.body) for m in peek(result.task_uuid)]
        assert [list(s) for s in ours] == [list(s) for s in go]
        assert [s["State"] for s in ours] == [s["State"] for s in go]
        assert [(bool(s["TaskName"]), s["CreatedAt"] == "0001-01-01T00:00:00Z") for s in ours] == [
            (bool(s["TaskName"]), s["CreatedAt"] == "0001-01-01T00:00:00Z") for s in go
        ]
        assert ours[-1]["Results"] == go[-1]["Results"]
        state = result.state()  # reading compacts the queue to the latest state
        assert (state.state, state.task_name, state.results[0].value if state.results else None) == (SUCCESS, "add", 2)
        assert [json.loads(m.body)["State"] for m in peek(result.task_uuid)] == [SUCCESS]
        # Go's GetState (basic.get + ack, oldest first) now gets the final state.
        assert json.loads(peek(result.task_uuid)[0].body)["State"] == SUCCESS
    finally:
        server.close()


def test_reads_a_go_state_stream_and_go_can_read_ours(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix)
    task_uuid = f"task_{uuid.uuid4()}"
    lines = capture("amqp_backend_states_retry.jsonl").splitlines()
    go_uuid = json.loads(lines[0])["TaskUUID"]
    exchange = server.config.amqp.exchange
    ttl = AMQPInt32(RESULTS_TTL * 1000)

    async def write_like_go(channel: aio_pika.abc.AbstractChannel) -> None:
        ex = await channel.declare_exchange(exchange, "direct", durable=True)
        q = await channel.declare_queue(task_uuid, auto_delete=True, arguments={"x-message-ttl": ttl, "x-expires": ttl})
        await q.bind(ex, task_uuid)
        for line in lines:
            await ex.publish(
                aio_pika.Message(
                    line.replace(go_uuid, task_uuid).encode(), content_type="application/json", delivery_mode=2
                ),
                task_uuid,
            )

    try:
        raw(write_like_go)
        state = server.result(task_uuid).state()
        assert (state.state, state.error, state.task_name) == (FAILURE, "retry me", "error_task")
        fresh = Server(amqp_config(prefix))  # another process: no cache, reads the compacted queue
        try:
            with pytest.raises(TaskFailed, match="retry me"):
                fresh.result(task_uuid).get(timeout=WAIT)
        finally:
            fresh.close()
    finally:
        server.close()


def test_await_state_waits_on_deliveries_not_polling(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix)
    gate = threading.Event()

    @server.task
    def slow() -> str:
        assert gate.wait(WAIT)
        return "done"

    backend = server.backend
    assert isinstance(backend, AMQPBackend)
    reads = Counter[str]()
    original = backend._read_stream

    async def counting(name: str, latest: Callable[[list[bytes]], int]) -> list[bytes] | None:
        reads[name] += 1
        return await original(name, latest)

    backend._read_stream = counting  # type: ignore[method-assign]
    try:
        with running_worker(server, concurrency=1):
            result = server.send_task(Signature("slow", []))
            threading.Timer(2.0, gate.set).start()
            assert result.get(timeout=WAIT) == "done"
        # One read on entry (and at most a couple more for states delivered meanwhile),
        # not one per 50 ms poll over two seconds.
        assert reads[result.task_uuid] <= 5
    finally:
        gate.set()
        server.close()


def test_group_completion_counts_distinct_members_and_the_chord_triggers_once(prefix: str, amqp_url: str) -> None:
    server, _ = make_server(prefix)
    backend = server.backend
    assert isinstance(backend, AMQPBackend)
    group_uuid = f"group_{uuid.uuid4()}"
    members = [
        Signature("add", [i], uuid=f"task_{uuid.uuid4()}", group_uuid=group_uuid, group_task_count=3) for i in range(3)
    ]

    async def scenario() -> tuple[list[bool], list[bool], list[str], list[bool], bool]:
        counted, decided = [], []
        await backend.set_state(members[0], SUCCESS)
        await backend.set_state(members[0], SUCCESS)  # redelivered and run again: counted once
        await backend.set_state(members[1], FAILURE, error="x")
        counted.append(await backend.group_completed(group_uuid, 3))  # Go's count: three messages
        decided.append(await backend.trigger_chord(group_uuid, 3))  # but two members: not yet, all put back
        await backend.set_state(members[2], SUCCESS)
        counted.append(await backend.group_completed(group_uuid, 3))
        states = await backend.group_task_states(group_uuid)
        order = [s.task_uuid for s in states if s is not None]
        triggers = await asyncio.gather(*(backend.trigger_chord(group_uuid, 3) for _ in range(10)))
        meta = await backend.get_group_meta(group_uuid)  # Go stores none: the members it was decided on
        return counted, decided, order, list(triggers), meta is not None and meta.task_uuids == order

    try:
        counted, decided, order, triggers, meta_ok = run_sync(scenario())
        assert counted == [True, True] and decided == [False]
        assert order == [m.uuid for m in members]  # completion order
        assert triggers.count(True) == 1
        assert meta_ok
        other = Server(amqp_config(prefix))  # another connection: still triggered
        try:
            assert run_sync(other.backend.trigger_chord(group_uuid, 3)) is False
        finally:
            other.close()
        message_count(chord_triggered_queue(group_uuid))  # exists: a Go worker's TriggerChord says no
        run_sync(backend.purge_group_meta(group_uuid))
        cleanup(prefix, [chord_triggered_queue(group_uuid), *(m.uuid for m in members)])
    finally:
        server.close()


# --------------------------------------------------------------------------- Go messages on our worker


def _fresh_uuids(text: str, routing_key: str) -> str:
    """A capture with new UUIDs (no state left from an earlier run) and this test's routing key
    (a Go retry republishes with the routing key the message carries)."""
    for old in set(re.findall(r"(?:task|chord|group)_[0-9a-f-]{36}", text)):
        text = text.replace(old, f"{old.split('_', 1)[0]}_{uuid.uuid4()}")
    return text.replace('"RoutingKey":"machinery_task"', f'"RoutingKey":"{routing_key}"')


def test_captured_go_messages_run_on_our_worker(prefix: str, amqp_url: str) -> None:
    server, rec = make_server(prefix)
    amqp = server.config.amqp
    try:
        with running_worker(server, concurrency=3):
            # add(1,1), as the Go client published it
            add = _fresh_uuids(capture("amqp_task_add.json").strip(), amqp.binding_key)
            publish_raw(amqp.exchange, amqp.binding_key, add.encode())
            assert server.result(json.loads(add)["UUID"]).get(timeout=WAIT) == 2

            # a chain add(1,1) -> add(5,5) -> multiply(4): 4 * (5 + 5 + 2)
            chain = _fresh_uuids(capture("amqp_chain.json").strip(), amqp.binding_key)
            publish_raw(amqp.exchange, amqp.binding_key, chain.encode())
            last = json.loads(chain)["OnSuccess"][0]["OnSuccess"][0]["UUID"]
            assert server.result(last).get(timeout=WAIT) == 48

            # a chord sent by Go (no group metadata on AMQP): callback gets 2, 4, 11 in completion order
            members = _fresh_uuids(capture("amqp_chord_tasks.jsonl"), amqp.binding_key).splitlines()
            for member in members:
                publish_raw(amqp.exchange, amqp.binding_key, member.encode())
            callback = json.loads(members[0])["ChordCallback"]["UUID"]
            assert server.result(callback).get(timeout=WAIT) == 88
            assert sorted(rec.of("multiply")[-1]) == [2, 4, 11]

            # a group sent by Go
            group = _fresh_uuids(capture("amqp_group_tasks.jsonl"), amqp.binding_key).splitlines()
            for member in group:
                publish_raw(amqp.exchange, amqp.binding_key, member.encode())
            assert [server.result(json.loads(m)["UUID"]).get(timeout=WAIT) for m in group] == [2, 4, 11]

            # a retry republish that went through a delay queue (x-death headers and all)
            envelope = json.loads(capture("amqp_retry_deadlettered_envelope.json"))
            body = _fresh_uuids(envelope["body"], amqp.binding_key)
            publish_raw(amqp.exchange, amqp.binding_key, body.encode(), headers=envelope["headers"])
            with pytest.raises(TaskFailed, match="retry me"):  # RetryCount 1: one more try, then FAILURE
                server.result(json.loads(body)["UUID"]).get(timeout=WAIT)
    finally:
        server.close()


# --------------------------------------------------------------------------- losing nothing


def test_connection_cut_with_1000_tasks_in_flight(
    prefix: str, amqp_url: str, record_property: Callable[[str, object], None]
) -> None:
    total, extra = 1000, 20
    server = Server(amqp_config(prefix, prefetch_count=0))
    executions = Counter[int]()
    lock = threading.Lock()

    @server.task
    async def work(i: int) -> int:
        with lock:
            executions[i] += 1
        await asyncio.sleep(0.02)
        return i

    async def send(numbers: range) -> list[str]:
        semaphore = asyncio.Semaphore(100)

        async def one(i: int) -> str:
            async with semaphore:
                return (await server.asend_task(Signature("work", [i]))).task_uuid

        return list(await asyncio.gather(*(one(i) for i in numbers)))

    try:
        with running_worker(server, concurrency=1):
            pass  # declare the workers' queue
        uuids = run_sync(send(range(total)))
        with running_worker(server, concurrency=20):
            wait_until(lambda: len(executions) >= 20, timeout=WAIT, what="tasks running")
            targets = own_connections()
            assert len(targets) >= 3  # the sender's, and the worker's consumer and backend connections
            wait_until(lambda: len(executions) >= 200, timeout=WAIT, what="200 tasks started")
            close_connections(targets)
            in_flight_at_cut = total - len(executions)
            uuids += run_sync(send(range(total, total + extra)))  # publishers reconnect by themselves
            wait_until(lambda: len(executions) == total + extra, timeout=120, what="every task running")

            def all_succeeded() -> bool:
                states = run_sync(server.backend.get_states(uuids))
                return all(s is not None and s.state == SUCCESS for s in states)

            wait_until(all_succeeded, timeout=60, what="every task's SUCCESS")
        missing = [i for i in range(total + extra) if executions[i] == 0]
        duplicates = sum(count - 1 for count in executions.values())
        report = (
            f"{total + extra} tasks ({total} sent before the cut, {extra} after), {len(targets)} connections cut with "
            f"{in_flight_at_cut} not yet started, executions {sum(executions.values())}, "
            f"duplicates {duplicates}, lost {len(missing)}"
        )
        print("\n" + report)
        record_property("amqp_cut_connection", report)
        assert not missing
    finally:
        server.close()


def test_the_backend_keeps_heartbeats_annotations_and_revocations_beside_the_states(prefix: str) -> None:
    server, _ = make_server(prefix)
    backend = server.backend
    task_uuid = f"task_{uuid.uuid4()}"
    try:
        with running_worker(server, concurrency=1, periodic=False) as worker:
            tags = lambda: [w.tag for w in run_sync(backend.get_workers())]  # noqa: E731
            wait_until(lambda: worker.consumer_tag in tags(), WAIT, "the worker's heartbeat")
        assert worker.consumer_tag not in tags()  # it said goodbye

        run_sync(backend.write_annotation(task_uuid, "progress", "old"))
        run_sync(backend.write_annotation(task_uuid, "progress", "new"))
        assert run_sync(backend.get_annotation(task_uuid, "progress")) == "new"  # only the latest is kept
        assert run_sync(backend.get_annotation(task_uuid, "traceback")) is None

        run_sync(backend.revoke(task_uuid, False))
        found = run_sync(backend.revocations(0))
        assert found is not None and found[1][task_uuid] is False
        run_sync(backend.revoke(task_uuid, True))
        version, revoked = run_sync(backend.revocations(found[0]))  # type: ignore[misc]
        assert revoked[task_uuid] is True  # terminate, once asked for, stays
        assert run_sync(backend.revocations(version)) is None  # nothing new since
    finally:
        queues = (f"{prefix}_ex.revocations", f"{prefix}_ex.workers", f"{task_uuid}.progress")
        run_sync(backend._delete_queues(*queues))  # type: ignore[attr-defined]
        server.close()


def test_workers_with_different_heartbeat_timeouts_share_the_workers_queue(prefix: str) -> None:
    # Each declares the workers queue; arguments that differed with the settings made RabbitMQ
    # refuse the second one and close the channel its state writes share.
    servers = [Server(replace(amqp_config(prefix), heartbeat_timeout=timeout)) for timeout in (30.0, 60.0)]
    for server in servers:
        server.register_task("add", lambda a, b: a + b)
    try:
        with (
            running_worker(servers[0], concurrency=1, periodic=False) as first,
            running_worker(servers[1], concurrency=1, periodic=False) as second,
        ):
            tags = lambda: {w.tag for w in run_sync(servers[0].backend.get_workers())}  # noqa: E731
            wait_until(lambda: {first.consumer_tag, second.consumer_tag} <= tags(), WAIT, "both heartbeats")
            assert servers[1].send_task(Signature("add", [2, 3])).get(timeout=WAIT) == 5
    finally:
        run_sync(servers[0].backend._delete_queues(f"{prefix}_ex.workers"))  # type: ignore[attr-defined]
        for server in servers:
            server.close()


def test_a_workers_queue_left_with_other_arguments_breaks_no_state_write(prefix: str) -> None:
    server = Server(amqp_config(prefix))
    server.register_task("add", lambda a, b: a + b)

    async def declare_as_an_older_version() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(f"{prefix}_ex.workers", arguments={"x-expires": 181000})

    run_sync(declare_as_an_older_version())
    try:
        with running_worker(server, concurrency=1, periodic=False) as worker:
            tags = lambda: {w.tag for w in run_sync(server.backend.get_workers())}  # noqa: E731
            wait_until(lambda: worker.consumer_tag in tags(), WAIT, "the worker's heartbeat")
            assert server.send_task(Signature("add", [2, 3])).get(timeout=WAIT) == 5
    finally:
        run_sync(server.backend._delete_queues(f"{prefix}_ex.workers"))  # type: ignore[attr-defined]
        server.close()


def test_a_task_sent_while_its_state_is_read_is_not_taken_for_consumed(prefix: str) -> None:
    # The read finds no queue, and this process sends the task before the read returns (a
    # worker sending a chain's next step while the chain's result is read): the state written
    # after the read looked is no sign that another reader took it.
    server = Server(amqp_config(prefix))
    backend = server.backend
    assert isinstance(backend, AMQPBackend)
    signature = Signature("add", [1, 2], uuid=f"task_{uuid.uuid4()}")
    read_stream = backend._read_stream

    async def read_then_send(name: str, latest: Callable[[list[bytes]], int]) -> list[bytes] | None:
        found = await read_stream(name, latest)
        await backend.set_pending([signature])
        return found

    backend._read_stream = read_then_send  # type: ignore[method-assign]
    try:
        state = run_sync(backend.get_state(signature.uuid))
        assert state is not None and state.state == PENDING
    finally:
        run_sync(backend.purge_state(signature.uuid))
        server.close()


def test_a_read_keeps_the_final_state_and_the_triggered_metadata_whatever_their_place(prefix: str) -> None:
    # A reader that puts a message back returns it to the head, so a concurrent reader can take
    # the older message after the newer one: what the queue keeps is chosen by its content.
    # Here the queues hold them in that order; each reader is a process of its own (no cache).
    task_uuid, group_uuid = f"task_{uuid.uuid4()}", f"group_{uuid.uuid4()}"
    writer = Server(amqp_config(prefix))
    readers = [Server(amqp_config(prefix)) for _ in range(2)]
    try:
        run_sync(writer.backend.write_states([TaskState(task_uuid, SUCCESS, "add")], False))
        run_sync(writer.backend.write_states([TaskState(task_uuid, STARTED, "add")], True))
        run_sync(writer.backend.write_group_meta(GroupMeta(group_uuid, [task_uuid], chord_triggered=True)))
        run_sync(writer.backend.write_group_meta(GroupMeta(group_uuid, [task_uuid])))
        for reader in readers:  # the second reads what the first left
            state = run_sync(reader.backend.get_state(task_uuid))
            assert state is not None and state.state == SUCCESS
            meta = run_sync(reader.backend.get_group_meta(group_uuid))
            assert meta is not None and meta.chord_triggered
    finally:
        run_sync(writer.backend._delete_queues(task_uuid, f"{group_uuid}_meta"))  # type: ignore[attr-defined]
        for server in (writer, *readers):
            server.close()
