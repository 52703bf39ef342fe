"""The dashboard's pages over real HTTP (uvicorn), on the memory broker: the token, a stuck
chord, dead-letter actions, and the overview."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from machinery import Chord, Config, Group, Server, Signature
from machinery.cli import main
from machinery.dashboard import create_app
from support.asgi import serving
from support.configs import push_raw
from support.fixtures import unique
from support.waiting import wait_until
from support.workers import running_worker


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, body, Set-Cookie) of a GET."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), response.headers.get("Set-Cookie", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), ""


def post(url: str, fields: dict[str, str]) -> str:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture
def server() -> Server:
    queue = unique("dash")
    made = Server(Config(broker=f"memory://{queue}", default_queue=queue))

    @made.task(name="ok")
    async def ok() -> int:
        return 1

    @made.task(name="broken")
    async def broken() -> None:
        raise RuntimeError("member failed")

    @made.task(name="collect")
    async def collect(*values: int) -> int:
        return sum(values)

    return made


@pytest.fixture
def base(server: Server) -> Iterator[str]:
    with serving(create_app(server, queues=["extra_q"])) as url:
        yield url


def test_a_token_is_required_when_given(server: Server) -> None:
    with serving(create_app(server, token="s3cret")) as url:
        assert get(f"{url}/")[0] == 401
        assert get(f"{url}/?token=wrong")[0] == 401
        status, _, cookie = get(f"{url}/?token=s3cret")
        assert status == 200 and "machinery_dashboard_token=s3cret" in cookie and "HttpOnly" in cookie
        assert get(f"{url}/partials/overview", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(f"{url}/partials/overview", {"Cookie": "machinery_dashboard_token=s3cret"})[0] == 200


def test_the_overview_shows_queues_and_live_workers(server: Server, base: str) -> None:
    for _ in range(2):
        server.send_task(Signature("ok"))
    _, page, _ = get(f"{base}/partials/overview")
    queue = server.config.default_queue
    assert f'data-queue="{queue}"' in page and 'data-queue="extra_q"' in page
    assert "No live workers" in page
    with running_worker(server, consumer_tag="dash-worker"):
        page = wait_until(lambda: "dash-worker" in (p := get(f"{base}/partials/overview")[1]) and p, what="the worker")
    assert "htmx" in get(f"{base}/static/htmx.min.js")[1][:200]
    assert 'hx-trigger="load, every 2s"' in get(f"{base}/")[1]


def test_a_stuck_chord_shows_the_member_it_waits_for(server: Server, base: str) -> None:
    # One member waits in a queue no worker takes: the chord never fires.
    stuck = Signature("ok", routing_key=unique("nobody"))
    chord = Chord(Group(Signature("ok"), Signature("broken"), stuck), Signature("collect"))
    with running_worker(server):
        result = server.send_chord(chord)
        failed = chord.group.signatures[1].uuid
        wait_until(lambda: (s := server.result(failed).state()) is not None and s.state == "FAILURE", what="failure")
    _, page, _ = get(f"{base}/tasks/{chord.group.group_uuid}")
    assert "<strong>not triggered</strong>: waiting for 1 member(s) to finish" in page
    assert f'href="/tasks/{chord.group.signatures[2].uuid}"' in page and "PENDING" in page
    assert f'href="/tasks/{failed}"' in page and "FAILURE" in page
    _, member, _ = get(f"{base}/tasks/{failed}")
    assert "member failed" in member and "Traceback" in member
    _, callback, _ = get(f"{base}/tasks/{result.task_uuid}")
    assert "No state for" in callback


def test_dead_letters_are_listed_requeued_and_purged(server: Server, base: str) -> None:
    queue = server.config.default_queue
    push_raw(server, b"bad message")
    with running_worker(server):
        wait_until(lambda: server.dead_letters(queue), what="a dead letter")
    _, page, _ = get(f"{base}/partials/dead")
    assert "bad message" in page and "hx-confirm=" in page
    assert "Requeued 1 dead letter(s) to" in post(f"{base}/dead/requeue", {"queue": queue})
    assert server.dead_letters(queue) == []
    push_raw(server, b"bad again")
    with running_worker(server):
        wait_until(lambda: len(server.dead_letters(queue)) == 2, what="both dead again")
    assert "Purged 2 dead letter(s) from" in post(f"{base}/dead/purge", {"queue": queue})
    assert server.dead_letters(queue) == []


def test_the_dashboard_refuses_an_open_address_without_a_token() -> None:
    result = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0"], env={"BROKER": "memory://x"})
    assert result.exit_code != 0
    assert "give --token too" in result.output


def test_throughput_is_measured_over_a_window_of_heartbeat_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    from machinery.dashboard import views

    clock = iter([0.0, 10.0, 20.0, 30.0, 100.0])
    monkeypatch.setattr(views.time, "monotonic", lambda: next(clock))
    watch = views.Watch()
    rates = [watch.throughput("q", n) for n in (0, 0, 20, 20, 20)][-1]
    # 20 tasks reported between 10 s and 20 s: 60/min over 20 s, 40/min over 30 s, then none
    # in the 60 s before 100 s (the samples at 30 s and 100 s hold the same count).
    assert rates == [0.0, 60.0, 40.0, 0.0]
