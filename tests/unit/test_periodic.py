"""Periodic tasks and workflows (docs/wire.md §12): robfig/cron specs, the lock, ticks fired once.

No test asserts how long anything took. Scheduling decisions are tested with an injected
clock; the multi-process test counts sends per tick, whatever the timing was.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from machinery import Config, Server, Signature
from machinery._sync import run_sync
from machinery.periodic import CronSchedule, EverySchedule, Scheduler, parse_go_duration, parse_spec
from machinery.types import unix_ns
from support.configs import config_for
from support.fixtures import unique
from support.waiting import wait_until
from support.workers import running_worker

UTC = timezone.utc
BASE = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)  # a Sunday


@pytest.fixture
def server(tmp_path: Path, queue_name: str) -> Iterator[Server]:
    server = Server(config_for("memory", tmp_path, queue_name))
    yield server
    server.close()


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("TZ=UTC */15 * * * *", datetime(2026, 3, 1, 12, 15, tzinfo=UTC)),
        ("TZ=UTC 5/15 * * * *", datetime(2026, 3, 1, 12, 5, tzinfo=UTC)),  # N/step = N-max/step
        ("TZ=UTC 0 0 ? * MON", datetime(2026, 3, 2, 0, 0, tzinfo=UTC)),  # ? is * in day fields
        ("TZ=UTC 0 0 1 * ?", datetime(2026, 4, 1, 0, 0, tzinfo=UTC)),
        ("TZ=UTC 0 12 * jan-mar mon-fri", datetime(2026, 3, 2, 12, 0, tzinfo=UTC)),
        ("TZ=UTC 0 0 1,15 * 1", datetime(2026, 3, 2, 0, 0, tzinfo=UTC)),  # both days restricted: either
        ("CRON_TZ=UTC @hourly", datetime(2026, 3, 1, 13, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @daily", datetime(2026, 3, 2, 0, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @midnight", datetime(2026, 3, 2, 0, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @weekly", datetime(2026, 3, 8, 0, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @monthly", datetime(2026, 4, 1, 0, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @yearly", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        ("CRON_TZ=UTC @annually", datetime(2027, 1, 1, 0, 0, tzinfo=UTC)),
        # 09:00 in New York on the next weekday (EST, UTC-5)
        ("CRON_TZ=America/New_York 0 9 * * MON-FRI", datetime(2026, 3, 2, 14, 0, tzinfo=UTC)),
        ("@every 1h30m", datetime(2026, 3, 1, 13, 30, tzinfo=UTC)),  # multiples of 5400 s since the epoch
        ("@every 10s", datetime(2026, 3, 1, 12, 0, 40, tzinfo=UTC)),
        ("@every 1s", datetime(2026, 3, 1, 12, 0, 31, tzinfo=UTC)),
        ("@every 300ms", datetime(2026, 3, 1, 12, 0, 31, tzinfo=UTC)),  # robfig: at least one second
        ("  @every 2m  ", datetime(2026, 3, 1, 12, 2, tzinfo=UTC)),
    ],
)
def test_good_specs(spec: str, expected: datetime) -> None:
    assert parse_spec(spec).next(BASE) == expected


def test_cron_fields_run_in_local_time_by_default() -> None:
    schedule = parse_spec("0 9 * * *")
    assert isinstance(schedule, CronSchedule)
    tick = schedule.next(BASE)
    assert tick is not None and tick.hour == 9 and tick.minute == 0


def test_impossible_date_never_fires() -> None:
    assert parse_spec("0 0 30 2 *").next(BASE) is None  # parses, as in robfig; no tick ever


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty spec string"),
        ("* * * *", "expected exactly 5 fields, found 4"),
        ("0 * * * * *", "expected exactly 5 fields, found 6"),  # no seconds field in ParseStandard
        ("@fortnightly", "unrecognized descriptor: @fortnightly"),
        ("@every", "unrecognized descriptor"),
        ("@every 1x", 'unknown unit "x"'),
        ("@every 10", "missing unit"),
        ("60 * * * *", r"end of range \(60\) above maximum \(59\)"),
        ("* 24 * * *", r"end of range \(24\) above maximum \(23\)"),
        ("* * 0 * *", r"beginning of range \(0\) below minimum \(1\)"),
        ("* * * 13 *", r"above maximum \(12\)"),
        ("* * * * 7", r"above maximum \(6\)"),
        ("5-3 * * * *", "beyond end of range"),
        ("*/0 * * * *", "step of range should be a positive number"),
        ("1-2-3 * * * *", "too many hyphens"),
        ("*/2/3 * * * *", "too many slashes"),
        ("x * * * *", "failed to parse int"),
        ("0 0 L * *", "failed to parse int"),
        ("0 0 * * 1#2", "failed to parse int"),
        ("CRON_TZ=Nowhere/Atlantis * * * * *", "provided bad location Nowhere/Atlantis"),
        ("TZ=UTC", "no schedule"),
    ],
)
def test_bad_specs_raise_with_the_reason(spec: str, reason: str, server: Server) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_spec(spec)
    with pytest.raises(ValueError, match=reason):
        server.register_periodic_task(spec, "bad", Signature("add", [1]))
    assert server.periodic_entries() == []


def test_go_durations() -> None:
    assert parse_go_duration("1h30m") == 5400 * 10**9
    assert parse_go_duration("1.5h") == 5400 * 10**9
    assert parse_go_duration("2h45m30.5s") == (2 * 3600 + 45 * 60 + 30) * 10**9 + 500_000_000
    assert parse_go_duration("300ms") == 300_000_000
    assert parse_go_duration("1us") == parse_go_duration("1µs") == 1000
    assert parse_go_duration("0") == 0
    assert parse_go_duration("-1s") == -(10**9)
    assert isinstance(parse_spec("@every -5s"), EverySchedule)  # robfig: below 1 s becomes 1 s
    for bad in ("", "1", "h", "1.5.5s", "1d"):
        with pytest.raises(ValueError, match="time: "):
            parse_go_duration(bad)


# --------------------------------------------------------------------------- entries


def test_entries_register_list_replace_remove(server: Server) -> None:
    server.register_periodic_task("@every 1m", "one", Signature("add", [1, 1]))
    server.register_periodic_chain("@hourly", "two", Signature("add", [1, 1]), Signature("multiply", [4]))
    server.register_periodic_group("@daily", "three", 2, Signature("add", [1, 1]), Signature("add", [5, 5]))
    server.register_periodic_chord("@weekly", "four", 0, Signature("multiply"), Signature("add", [1, 1]))
    assert [(e.name, e.kind, e.spec) for e in server.periodic_entries()] == [
        ("four", "chord", "@weekly"),
        ("one", "task", "@every 1m"),
        ("three", "group", "@daily"),
        ("two", "chain", "@hourly"),
    ]
    assert all(e.next_run is not None for e in server.periodic_entries())
    server.register_periodic_task("@every 5m", "one", Signature("add", [2, 2]))  # same name: replaced
    assert [e.spec for e in server.periodic_entries() if e.name == "one"] == ["@every 5m"]
    assert server.remove_periodic("two") is True
    assert server.remove_periodic("two") is False
    assert [e.name for e in server.periodic_entries()] == ["four", "one", "three"]


def test_each_tick_sends_a_fresh_copy(server: Server) -> None:
    template = Signature("add", [1, 1], uuid="task_fixed", on_success=[Signature("multiply", [2], uuid="task_x")])
    task = server.register_periodic_task("@every 1s", "task", template)
    chain = server.register_periodic_chain("@every 1s", "chain", Signature("add", [1]), Signature("add", [2]))
    group = server.register_periodic_group("@every 1s", "group", 0, Signature("add", [1]), Signature("add", [2]))
    chord = server.register_periodic_chord("@every 1s", "chord", 1, Signature("multiply"), Signature("add", [1]))

    async def send_twice() -> list[Any]:
        return [await e.send(server.dispatcher) for e in (task, chain, group, chord) for _ in range(2)]

    sent = run_sync(send_twice())
    queued = server.get_pending_tasks()
    uuids = [s.uuid for s in queued]
    assert len(uuids) == len(set(uuids)) == 2 + 2 + 4 + 2
    assert "task_fixed" not in uuids
    # A nested callback's fixed UUID is cleared too: the worker gives it a new one when sending it.
    assert {s.on_success[0].uuid for s in queued if s.on_success and s.on_success[0].name == "multiply"} == {""}
    chord_callbacks = {s.chord_callback.uuid for s in queued if s.chord_callback is not None}
    assert len(chord_callbacks) == 2 and all(u.startswith("chord_") for u in chord_callbacks)
    assert sent[4][0].task_uuid != sent[5][0].task_uuid  # the groups' members
    assert template.uuid == "task_fixed"  # the caller's template is untouched


def test_lock_key_matches_go_and_can_name_a_go_binary(tmp_path: Path, queue_name: str) -> None:
    default = Server(config_for("memory", tmp_path, queue_name))
    entry = default.register_periodic_task("*/5 * * * *", "report", Signature("add", [1]))
    program = Path(sys.argv[0]).name
    assert default.periodic.lock_key(entry) == f"machinery_lock_{program}report*/5 * * * *"
    named = Server(config_for("memory", tmp_path, queue_name, periodic_lock_program="myservice"))
    entry = named.register_periodic_task("*/5 * * * *", "report", Signature("add", [1]))
    assert named.periodic.lock_key(entry) == "machinery_lock_myservicereport*/5 * * * *"
    assert Config.from_env({"PERIODIC_LOCK_PROGRAM": "gobin"}).periodic_lock_program == "gobin"


# --------------------------------------------------------------------------- falling behind


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def fired_ticks(scheduler: Scheduler) -> list[datetime]:
    fired: list[datetime] = []

    async def fake_fire(entry: Any, tick: datetime, following: datetime | None) -> None:
        fired.append(tick)

    scheduler._fire = fake_fire  # type: ignore[method-assign]
    return fired


def run_due(scheduler: Scheduler, now: datetime) -> None:
    async def go() -> None:
        for firing in scheduler.due(now):
            await firing

    asyncio.run(go())


def test_no_burst_of_missed_ticks_after_a_pause(server: Server) -> None:
    clock = FakeClock(BASE)
    server.periodic._clock = clock
    fired = fired_ticks(server.periodic)
    entry = server.register_periodic_task("@every 1s", "tick", Signature("add", [1]))
    second = timedelta(seconds=1)
    assert entry.next_run == BASE + second  # 12:00:31
    run_due(server.periodic, BASE + 1.01 * second)
    assert fired == [BASE + second]
    # Paused for ten seconds: of the ten ticks missed only the latest (0.2 s ago) fires,
    # once; the schedule resumes at the next future tick.
    run_due(server.periodic, BASE + 11.2 * second)
    assert fired == [BASE + second, BASE + 11 * second]
    assert entry.next_run == BASE + 12 * second
    run_due(server.periodic, BASE + 11.9 * second)
    assert fired == [BASE + second, BASE + 11 * second]
    run_due(server.periodic, BASE + 12 * second)
    assert fired == [BASE + second, BASE + 11 * second, BASE + 12 * second]
    # Paused for an hour: nothing is owed but the latest tick.
    run_due(server.periodic, BASE + 3612.5 * second)
    assert fired[3:] == [BASE + 3612 * second] and entry.next_run == BASE + 3613 * second


def test_slightly_late_tick_fires_once_and_long_late_one_is_skipped(server: Server) -> None:
    clock = FakeClock(BASE)
    server.periodic._clock = clock
    fired = fired_ticks(server.periodic)
    entry = server.register_periodic_task("CRON_TZ=UTC @hourly", "hourly", Signature("add", [1]))
    one = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    run_due(server.periodic, one + timedelta(seconds=2))  # a busy loop: 2 s late, still this tick
    assert fired == [one]
    run_due(server.periodic, one + timedelta(seconds=3))
    assert fired == [one]  # once
    run_due(server.periodic, one + timedelta(hours=1, minutes=10))  # paused past 14:00 by 10 min
    assert fired == [one] and entry.next_run == one + timedelta(hours=2)


def test_scheduler_sends_with_the_lock_value_of_go(server: Server) -> None:
    taken: list[tuple[str, int]] = []
    lock = server.lock
    original = lock.lock

    async def spy(key: str, deadline_ns: int, retries: int = 3) -> bool:
        taken.append((key, deadline_ns))
        return await original(key, deadline_ns, retries)

    lock.lock = spy  # type: ignore[method-assign]
    # Unique names: the in-process lock is shared by every server of the process.
    entry = server.register_periodic_task("@every 1s", unique("tick"), Signature("add", [1]))
    tick = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)  # its lock is live

    async def fire_twice() -> None:
        await server.periodic._fire(entry, tick, tick + timedelta(seconds=1))
        await server.periodic._fire(entry, tick, tick + timedelta(seconds=1))  # another process, same tick

    asyncio.run(fire_twice())
    assert taken == [(server.periodic.lock_key(entry), unix_ns(tick + timedelta(seconds=1)) - 1)] * 2
    assert len(server.get_pending_tasks()) == 1  # the second one lost the lock


# --------------------------------------------------------------------------- where it runs


def test_worker_runs_the_scheduler_by_default(server: Server) -> None:
    done = threading.Event()
    runs: list[int] = []

    @server.task
    def beat(n: int) -> None:
        runs.append(n)
        if len(runs) >= 2:
            done.set()

    server.register_periodic_task("@every 1s", unique("beat"), Signature("beat", [7]))
    with running_worker(server, concurrency=2):
        assert done.wait(15), "the worker's scheduler did not fire twice"
    assert runs[:2] == [7, 7]


def test_worker_without_periodic_runs_no_scheduler(server: Server) -> None:
    server.register_periodic_task("@every 1s", "beat", Signature("beat", [7]))
    with running_worker(server, concurrency=2, periodic=False) as worker:
        assert worker.periodic is False
        assert server.periodic._stops == set()  # no scheduler loop is registered


def test_run_periodic_alone_and_stop(server: Server) -> None:
    server.register_periodic_task("@every 1s", unique("tick"), Signature("tick", []))
    thread = threading.Thread(target=lambda: asyncio.run(server.arun_periodic()), daemon=True)
    thread.start()
    try:
        wait_until(server.get_pending_tasks, timeout=15, what="a tick sent")
    finally:
        server.stop_periodic()
        thread.join(10)
    assert not thread.is_alive()
    assert server.get_pending_tasks()[0].name == "tick"


# --------------------------------------------------------------------------- locks (Go's semantics)
