"""Bad input is settled, never left taken: nested JSON, nameless messages, unknown tasks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WAIT, config_for, push_raw, running_worker, wait_until
from machinery import Config, Server, Signature
from machinery._sync import run_sync

NESTED = b"[" * 10_000 + b"]" * 10_000


@pytest.fixture
def server(backend_kind: str, tmp_path: Path, queue_name: str) -> Iterator[Server]:
    server = Server(config_for(backend_kind, tmp_path, queue_name))
    yield server
    server.close()


def make(server: Server, **overrides: object) -> Server:
    config = server.config
    fields = {f: getattr(config, f) for f in ("broker", "default_queue", "redis", "heartbeat_timeout")}
    return Server(Config(**{**fields, **overrides}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        NESTED,
        b'{"Name":"add","Args":' + NESTED + b"}",
        b'{"Name":"add","Headers":{"a":' + NESTED + b"}}",
    ],
    ids=["nested-array", "nested-args", "nested-header"],
)
def test_deeply_nested_json_is_dead_lettered_and_inspection_survives_it(server: Server, body: bytes) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    push_raw(server, body)
    assert server.get_pending_tasks() == []  # listed as nothing, not a crash
    with running_worker(server, concurrency=1):
        wait_until(lambda: server.dead_letters(), what="the nested message dead-lettered")
        assert add.send(1, 2).get(timeout=WAIT) == 3
    (letter,) = server.dead_letters()
    assert letter.body == body
    assert "recursion" in letter.reason.lower() or "deep" in letter.reason.lower()


@pytest.mark.parametrize(
    "body",
    [b'{"UUID":"task_nameless"}', b'{"UUID":"task_nameless","Name":null}', b'{"UUID":"task_nameless","Name":""}'],
    ids=["missing", "null", "empty"],
)
def test_a_message_without_a_name_is_dead_lettered_as_malformed(server: Server, body: bytes) -> None:
    push_raw(server, body)
    with running_worker(server, concurrency=1):
        wait_until(lambda: server.dead_letters(), what="the nameless message dead-lettered")
    (letter,) = server.dead_letters()
    assert letter.body == body and "names no task" in letter.reason
    assert server.get_pending_tasks() == []


def test_unknown_tasks_do_not_slow_the_registered_ones_behind_them(server: Server) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    unknown = [server.send_task(Signature("nosuchtask", [i])) for i in range(160)]
    with running_worker(server, concurrency=4):
        results = [add.send(i, i) for i in range(200)]
        # Under the old worker-wide back-off this took about 108 s; the deadline is generous.
        assert [r.get(timeout=30) for r in results] == [2 * i for i in range(200)]
    pending = {s.uuid for s in server.get_pending_tasks()} | {s.uuid for s in server.get_delayed_tasks()}
    assert pending == {r.task_uuid for r in unknown}  # someone else's tasks: left for them, not lost


def test_an_unknown_task_is_dead_lettered_after_the_configured_time(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="machinery")
    strict = make(server, unregistered_task_timeout=0.5)
    try:
        result = strict.send_task(Signature("nosuchtask", [1]))
        with running_worker(strict, concurrency=1):
            wait_until(lambda: strict.dead_letters(), what="the unknown task dead-lettered")
        (letter,) = strict.dead_letters()
        assert Signature.decode(letter.body).uuid == result.task_uuid
        assert "not registered on any worker that saw it" in letter.reason
        assert strict.get_pending_tasks() == []
        warnings = [r for r in caplog.records if "is not registered with this worker" in r.getMessage()]
        assert len(warnings) == 1  # said once, not per requeue
    finally:
        run_sync(strict.aclose())
