"""The results-off backend (Go's ``null``): tasks run, nothing is stored, reads say so at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from machinery import Chord, Config, Group, ResultsDisabledError, Server, Signature
from machinery.backends.null import NullBackend
from machinery.errors import UnsupportedOperation
from machinery.locks.memory import MemoryLock
from support.configs import config_for
from support.waiting import WAIT, wait_until
from support.workers import running_worker


@pytest.mark.parametrize("url", ["null", "null://", "NULL"])
def test_null_and_null_url_are_the_results_off_backend(url: str) -> None:
    server = Server(Config(broker="memory://null_forms", result_backend=url))
    assert isinstance(server.backend, NullBackend)
    assert isinstance(server.lock, MemoryLock)  # as Go: no lock without a store, the in-process one


@pytest.fixture(params=["memory", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path, queue_name: str) -> Iterator[Server]:
    server = Server(config_for(request.param, tmp_path, queue_name, result_backend="null"))
    yield server
    server.close()


def test_tasks_run_and_nothing_is_stored(server: Server) -> None:
    ran: list[int] = []
    done = threading.Event()

    @server.task
    def record(value: int) -> None:
        ran.append(value)
        if len(ran) == 3:
            done.set()

    sent = [record.send(i) for i in range(2)]
    sent += server.send_group(Group(Signature("record", [2])))
    with running_worker(server, concurrency=2):
        assert done.wait(WAIT)
    assert sorted(ran) == [0, 1, 2]
    if server.config.broker.startswith("redis"):
        client = redis.Redis.from_url(server.config.broker)
        assert [client.get(result.task_uuid) for result in sent] == [None, None, None]
        wait_until(lambda: client.llen(server.config.default_queue) == 0, what="the queue to empty")
        client.close()


def test_reading_a_result_raises_at_once(server: Server) -> None:
    result = server.send_task(Signature("anything"))
    with pytest.raises(ResultsDisabledError, match="stores no task states"):
        result.get(timeout=None)  # no wait: there is nothing that could ever come
    with pytest.raises(ResultsDisabledError):
        result.state()
    assert isinstance(ResultsDisabledError("x"), UnsupportedOperation)


def test_a_chord_is_refused_when_sent(server: Server) -> None:
    chord = Chord(Group(Signature("a"), Signature("b")), Signature("callback"))
    with pytest.raises(UnsupportedOperation, match="chord needs its members' states"):
        server.send_chord(chord)
    assert server.get_pending_tasks() == []
