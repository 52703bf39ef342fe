"""Tracing in one process: spans exported with the real OTLP exporter to a loopback receiver.

The worker runs on the memory broker beside the test; every span travels through
``OTLPSpanExporter`` over HTTP and is decoded from protobuf by the receiver.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from machinery import Chain, Chord, Config, Group, Server, Signature
from machinery.retry import RetryTaskLater
from machinery.tracing import TracingMiddleware
from support.fixtures import unique
from support.otlp import OtlpReceiver, ReceivedSpan
from support.waiting import wait_until
from support.workers import running_worker

PRODUCER, CONSUMER, ERROR = 4, 5, 2


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    started = OtlpReceiver().start()
    yield started
    started.stop()


@pytest.fixture
def provider(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    made = TracerProvider(resource=Resource.create({"service.name": "tracing-test"}))
    made.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    yield made
    made.shutdown()


@pytest.fixture
def server(provider: TracerProvider) -> Server:
    queue = unique("traced")
    made = Server(Config(broker=f"memory://{queue}", default_queue=queue), middleware=[TracingMiddleware(provider)])

    @made.task(name="add")
    async def add(a: int, b: int) -> int:
        return a + b

    @made.task(name="explode")
    async def explode() -> None:
        raise ValueError("kaboom")

    @made.task(name="query")
    def query(label: str) -> str:
        # A def task runs on a thread: what it traces must nest under its process span.
        with provider.get_tracer("app").start_as_current_span(f"db {label}"):
            return label

    attempts: list[int] = []

    @made.task(name="flaky")
    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RetryTaskLater("not yet", delay=0)
        return "done"

    @made.task(name="total")
    async def total(*values: int) -> int:
        return sum(values)

    return made


def one(receiver: OtlpReceiver, name: str, count: int = 1) -> list[ReceivedSpan]:
    return wait_until(lambda: (s := receiver.named(name)) and len(s) >= count and s, what=f"{count} span(s) {name}")


def test_send_and_process_spans_are_parent_and_child_with_attributes(
    server: Server, receiver: OtlpReceiver, provider: TracerProvider
) -> None:
    with running_worker(server, concurrency=2):
        with provider.get_tracer("app").start_as_current_span("request") as request:
            result = server.send_task(Signature("add", args=[2, 3]))
        assert result.get(timeout=10) == 5
        (process,) = one(receiver, "process add")
    (send,) = one(receiver, "send add")
    assert send.kind == PRODUCER and process.kind == CONSUMER
    assert send.trace_id == process.trace_id == format(request.get_span_context().trace_id, "032x")
    assert send.parent_span_id == format(request.get_span_context().span_id, "016x")
    assert process.parent_span_id == send.span_id
    assert send.attributes["messaging.destination.name"] == server.config.default_queue
    assert process.attributes["messaging.system"] == "machinery"
    assert process.attributes["messaging.destination.name"] == server.config.default_queue
    assert process.attributes["messaging.message.id"] == result.task_uuid
    assert process.attributes["machinery.task.name"] == "add"
    assert process.attributes["machinery.retry_count"] == 0
    assert process.attributes["machinery.task.state"] == "SUCCESS"
    assert process.status_code != ERROR


def test_the_headers_carry_w3c_trace_context(server: Server) -> None:
    signature = Signature("add")
    server.send_task(signature)
    assert signature.headers is not None
    version, trace_id, span_id, flags = signature.headers["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled
    assert server.get_pending_tasks()[0].headers == signature.headers


def test_a_failure_sets_error_status_with_the_exception(server: Server, receiver: OtlpReceiver) -> None:
    with running_worker(server):
        result = server.send_task(Signature("explode"))
        with pytest.raises(Exception, match="kaboom"):
            result.get(timeout=10)
        (process,) = one(receiver, "process explode")
    assert process.status_code == ERROR
    assert process.status_message == "kaboom"
    assert "exception" in process.events
    assert process.attributes["machinery.task.state"] == "FAILURE"


def test_a_def_task_on_its_thread_nests_its_spans_under_the_process_span(
    server: Server, receiver: OtlpReceiver
) -> None:
    with running_worker(server):
        assert server.send_task(Signature("query", args=["users"])).get(timeout=10) == "users"
        (db,) = one(receiver, "db users")
        (process,) = one(receiver, "process query")
    assert db.parent_span_id == process.span_id
    assert db.trace_id == process.trace_id


def test_a_chain_stays_in_one_trace(server: Server, receiver: OtlpReceiver) -> None:
    arg = 1
    chain = Chain(Signature("add", args=[arg, arg]), Signature("add", args=[arg]), Signature("add", args=[arg]))
    second, third = chain.signatures[1], chain.signatures[2]
    with running_worker(server):
        assert server.send_chain(chain).get(timeout=10) == 4
        processes = one(receiver, "process add", 3)
    # The later steps carried the first send's context in their headers before any worker ran.
    assert second.headers and third.headers and "traceparent" in second.headers
    assert len({s.trace_id for s in processes}) == 1
    sends = one(receiver, "send add", 3)
    by_id = {s.span_id: s for s in [*sends, *processes]}
    # Step 2's send is a child of step 1's process span: the worker published it while processing.
    later_sends = [s for s in sends if by_id.get(s.parent_span_id, s).kind == CONSUMER]
    assert len(later_sends) == 2


def test_a_chord_traces_every_member_and_the_callback(
    server: Server, receiver: OtlpReceiver, provider: TracerProvider
) -> None:
    members = [Signature("add", args=[i, i]) for i in range(3)]
    chord = Chord(Group(*members), Signature("total"))
    with running_worker(server, concurrency=3):
        with provider.get_tracer("app").start_as_current_span("fan out"):
            assert server.send_chord(chord).get(timeout=10) == 6
        (callback,) = one(receiver, "process total")
        processes = one(receiver, "process add", 3)
    assert chord.callback.headers and "traceparent" in chord.callback.headers
    assert len({s.trace_id for s in [callback, *processes]}) == 1
    assert {p.attributes["machinery.group_uuid"] for p in processes} == {chord.group.group_uuid}
    assert {p.attributes["machinery.chord_callback"] for p in processes} == {chord.callback.uuid}
    (send_callback,) = one(receiver, "send total")
    assert callback.parent_span_id == send_callback.span_id
    assert send_callback.parent_span_id in {p.span_id for p in processes}


def test_with_the_jaeger_propagator_our_sends_write_uber_trace_id(provider: TracerProvider) -> None:
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.jaeger import JaegerPropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = CompositePropagator([TraceContextTextMapPropagator(), JaegerPropagator()])
    queue = unique("jaeger")
    server = Server(
        Config(broker=f"memory://{queue}", default_queue=queue), middleware=[TracingMiddleware(provider, propagator)]
    )
    signature = Signature("anything")
    server.send_task(signature)
    assert signature.headers is not None
    trace_id = signature.headers["traceparent"].split("-")[1]
    # What a Go worker's Jaeger tracer reads: trace id, span id, parent (0), flags.
    jaeger_trace, jaeger_span, _, _ = signature.headers["uber-trace-id"].split(":")
    assert jaeger_trace.zfill(32) == trace_id
    assert jaeger_span.zfill(16) == signature.headers["traceparent"].split("-")[2]


def test_a_retry_is_recorded_and_its_republish_nests_under_the_attempt(server: Server, receiver: OtlpReceiver) -> None:
    with running_worker(server):
        assert server.send_task(Signature("flaky")).get(timeout=10) == "done"
        first, second = sorted(one(receiver, "process flaky", 2), key=lambda s: s.attributes["machinery.task.state"])
    assert (first.attributes["machinery.task.state"], second.attributes["machinery.task.state"]) == ("RETRY", "SUCCESS")
    assert "exception" in first.events and first.status_code != ERROR
    resend = next(s for s in receiver.named("send flaky") if s.parent_span_id == first.span_id)
    assert second.parent_span_id == resend.span_id
    assert first.trace_id == second.trace_id
