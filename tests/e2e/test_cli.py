"""The command line: in-process through CliRunner, and the installed ``machinery`` script for real."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from machinery import Arg, Chord, Config, Group, Server, Signature, Worker
from machinery._sync import run_sync
from machinery.cli import BadArgument, main, parse_arg, parse_eta
from support.cli import assert_one_line_error, invoke, subprocess_env
from support.waiting import wait_until
from support.workers import running_worker

REPO = Path(__file__).resolve().parents[2]
MACHINERY = Path(sys.executable).with_name("machinery")

# The tasks of the module the CLI loads; ``tasks_server`` registers the same ones in-process.
TASK_DEFINITIONS = """
@server.task
def add(*args: int) -> int:
    return sum(args)


@server.task
def boom() -> None:
    raise ValueError("boom went the task")
"""

TASKS_MODULE = (
    """
from machinery import Config, Server

server = Server(Config.from_env())
not_a_server = 42

"""
    + TASK_DEFINITIONS
)

PERIODIC_LINES = """
server.register_periodic_task("@every 1s", "every_second", add.signature(1, 2))
server.register_periodic_chain("@hourly", "hourly_chain", add.signature(1, 1), add.signature(5, 5))
"""


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'machinery.db'}"


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A directory holding a tasks module, made the current directory; returns the module name."""
    name = f"cli_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TASKS_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the CLI's insertion of the cwd
    return name


@pytest.fixture
def memory_env() -> dict[str, str]:
    return {"BROKER": f"memory://cli_{uuid.uuid4().hex[:8]}", "DEFAULT_QUEUE": "cli_q"}


# --------------------------------------------------------------------------- help


COMMANDS = (
    "worker",
    "periodic",
    "send",
    "status",
    "pending",
    "delayed",
    "dead",
    "requeue-dead",
    "demo",
    "inspect",
    "purge",
    "ping",
    "dashboard",
)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: machinery " + command in result.output
    assert "Example" in result.output


def test_the_overview_lists_every_command_on_one_line() -> None:
    result = CliRunner().invoke(main, ["--help"], prog_name="machinery", terminal_width=80)
    assert result.exit_code == 0
    for command in COMMANDS:
        line = next(line for line in result.output.splitlines() if line.strip().startswith(command + " "))
        assert not line.endswith("..."), f"the summary of {command} is cut: {line!r}"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Arg("int64", 1)),
        ("-7", Arg("int64", -7)),
        ("1.5", Arg("float64", 1.5)),
        ("true", Arg("bool", True)),
        ('"x"', Arg("string", "x")),
        ("hello", Arg("string", "hello")),
        ("007", Arg("string", "007")),
        ("[1,2]", Arg("[]int64", [1, 2])),
        ('["a","b"]', Arg("[]string", ["a", "b"])),
        ("[1, 2.5]", Arg("[]float64", [1, 2.5])),
        ("int32:5", Arg("int32", 5)),
        ("uint64:18446744073709551615", Arg("uint64", 18446744073709551615)),
        ("string:42", Arg("string", "42")),
        ("float32:2", Arg("float32", 2)),
        ("[]byte:hi", Arg("[]byte", b"hi")),
        ("[]int64:[]", Arg("[]int64", [])),
        ("http://example.com", Arg("string", "http://example.com")),
    ],
)
def test_arguments_are_json_with_go_default_types(text: str, expected: Arg) -> None:
    assert parse_arg(text, 1) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1,", "not valid JSON"),
        ("null", "null has no Go type"),
        ('{"a": 1}', "a JSON object has no Go type"),
        ("[]", "empty list"),
        ("[1, true]", "one scalar type"),
        ("99999999999999999999", "uint64:99999999999999999999"),
        ("int8:300", "not a valid int8"),
        ("int32:x", "not a JSON value for int32"),
        ("--bogus", "no such option: --bogus"),
    ],
)
def test_bad_arguments_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(BadArgument, match=message.replace("[", r"\[")):
        parse_arg(text, 1)


def test_eta_is_seconds_from_now_or_an_iso_time_with_a_zone() -> None:
    soon = parse_eta("2.5") - datetime.now(timezone.utc)
    assert timedelta(seconds=2) < soon <= timedelta(seconds=2.5)
    assert parse_eta("2030-01-02T15:04:05Z") == datetime(2030, 1, 2, 15, 4, 5, tzinfo=timezone.utc)
    assert parse_eta("2030-01-02T17:04:05+02:00") == datetime(2030, 1, 2, 15, 4, 5, tzinfo=timezone.utc)
    for bad, message in (("2030-01-02T15:04:05", "no time zone"), ("soon", "seconds from now"), ("-1", ">= 0")):
        with pytest.raises(BadArgument, match=message):
            parse_eta(bad)


def test_send_publishes_typed_arguments_and_options(memory_env: dict[str, str]) -> None:
    result = invoke(
        ["send", "add", "1", "-2", "2.5", "word", "int32:7", "--retry-count", "3", "-Q", "other"], memory_env
    )
    assert result.exit_code == 0, result.output
    task_uuid = result.stdout.strip()
    assert task_uuid.startswith("task_")
    server = Server(Config(broker=memory_env["BROKER"], default_queue="cli_q"))
    (sent,) = server.get_pending_tasks("other")
    assert sent.uuid == task_uuid
    assert sent.args == [Arg("int64", 1), Arg("int64", -2), Arg("float64", 2.5), Arg("string", "word"), Arg("int32", 7)]
    assert sent.retry_count == 3
    assert run_sync(server.backend.get_state(task_uuid)).state == "PENDING"  # type: ignore[union-attr]


def test_send_with_a_bad_argument_is_one_line_and_sends_nothing(memory_env: dict[str, str]) -> None:
    result = invoke(["send", "add", "1", "[1,"], memory_env)
    assert_one_line_error(result, "argument 2", "not valid JSON")
    assert result.exit_code == 2
    server = Server(Config(broker=memory_env["BROKER"], default_queue="cli_q"))
    assert server.get_pending_tasks() == []


def test_send_warns_about_a_task_the_app_does_not_register(app_dir: str, memory_env: dict[str, str]) -> None:
    result = invoke(["send", "-A", f"{app_dir}:server", "ad", "1"], memory_env)
    assert result.exit_code == 0
    assert "'ad' is not registered" in result.stderr and "add, boom" in result.stderr


# --------------------------------------------------------------------------- sqlite file: send, status, pending


def test_send_status_pending_delayed_on_a_sqlite_file(tmp_path: Path) -> None:
    config_file = tmp_path / "machinery.yml"
    config_file.write_text(f"broker: {sqlite_url(tmp_path)}\ndefault_queue: cli_sqlite\n")
    config = ["--config", str(config_file)]

    sent = invoke(["send", *config, "add", "1", "2"])
    assert sent.exit_code == 0, sent.output
    task_uuid = sent.stdout.strip()
    later = invoke(["send", *config, "add", "5", "--eta", "60"])
    assert later.exit_code == 0, later.output
    later_uuid = later.stdout.strip()

    pending = invoke(["pending", *config])
    assert pending.exit_code == 0, pending.output
    assert pending.stdout.splitlines()[0].split() == ["UUID", "TASK", "ARGS"]
    assert f"{task_uuid}  add   1, 2" in pending.stdout
    assert later_uuid not in pending.stdout
    assert pending.stdout.splitlines()[-1] == "1 task pending in cli_sqlite"

    delayed = invoke(["delayed", *config])
    assert delayed.exit_code == 0, delayed.output
    assert later_uuid in delayed.stdout and "cli_sqlite" in delayed.stdout and "(in " in delayed.stdout
    assert delayed.stdout.splitlines()[-1] == "1 task delayed"

    status = invoke(["status", *config, task_uuid])
    assert status.exit_code == 0, status.output
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert fields["uuid"] == task_uuid
    assert fields["state"] == "PENDING"
    assert fields["task"] == "add"
    assert fields["created"].endswith("ago)")

    # The same file through the environment instead of --config.
    env = {"BROKER": sqlite_url(tmp_path), "DEFAULT_QUEUE": "cli_sqlite"}
    assert task_uuid in invoke(["pending"], env).stdout

    unknown = invoke(["status", *config, "task_nope"])
    assert_one_line_error(unknown, "no state for task_nope")


def test_status_shows_results_and_errors(memory_env: dict[str, str]) -> None:
    server = Server(Config(broker=memory_env["BROKER"], default_queue="cli_q"))

    @server.task
    def pair(a: int) -> tuple[int, str]:
        return a, "x"

    @server.task
    def fail() -> None:
        raise RuntimeError("it broke")

    with running_worker(server):
        good, bad = pair.send(4), fail.send()
        good.get(10)
        with pytest.raises(Exception, match="it broke"):
            bad.get(10)
    shown = invoke(["status", good.task_uuid], memory_env).stdout
    assert "SUCCESS" in shown and 'results  4 (int64), "x" (string)' in shown
    shown = invoke(["status", bad.task_uuid], memory_env).stdout
    assert "FAILURE" in shown and "error    it broke" in shown


# --------------------------------------------------------------------------- dead letters


def test_dead_and_requeue_dead_show_a_malformed_message(tmp_path: Path) -> None:
    config = Config(broker=sqlite_url(tmp_path), default_queue="cli_dead")
    server = Server(config)
    asyncio.run(server.broker._push([("cli_dead", b"this is not a task")]))
    with running_worker(server):
        wait_until(server.dead_letters, what="the dead letter")
    env = {"BROKER": sqlite_url(tmp_path), "DEFAULT_QUEUE": "cli_dead"}

    dead = invoke(["dead"], env)
    assert dead.exit_code == 0, dead.output
    lines = dead.stdout.splitlines()
    assert lines[0].split() == ["TIME", "REASON", "MESSAGE"]
    assert "not JSON" in lines[1] and "this is not a task" in lines[1]
    assert lines[2] == "1 dead letter in cli_dead"
    assert "machinery requeue-dead cli_dead" in lines[3]

    requeued = invoke(["requeue-dead"], env)
    assert requeued.exit_code == 0, requeued.output
    assert requeued.stdout.strip() == "Requeued 1 dead letter to cli_dead"
    assert invoke(["dead"], env).stdout.strip() == "0 dead letters in cli_dead"
    assert invoke(["requeue-dead", "cli_dead"], env).stdout.strip() == "Requeued 0 dead letters to cli_dead"


# --------------------------------------------------------------------------- one-line errors


def test_a_missing_module_is_one_line(app_dir: str) -> None:
    result = invoke(["worker", "-A", "myapp.tasks:server"])
    assert_one_line_error(result, "cannot import 'myapp.tasks'", "No module named 'myapp'", "run from your project")


def test_a_module_whose_import_fails_names_the_error_and_place(app_dir: str, tmp_path: Path) -> None:
    (tmp_path / "broken_tasks_mod.py").write_text("import os\n1 / 0\n")
    result = invoke(["pending", "-A", "broken_tasks_mod:server"])
    assert_one_line_error(result, "ZeroDivisionError", "broken_tasks_mod.py, line 2")
    (tmp_path / "needs_dep_mod.py").write_text("import surely_not_installed_pkg\n")
    result = invoke(["pending", "-A", "needs_dep_mod:server"])
    assert_one_line_error(result, "it imports 'surely_not_installed_pkg', which is not installed")


@pytest.mark.parametrize(
    ("attr", "fragments"),
    [
        ("srv", ("has no attribute 'srv'", "Servers in it: server")),
        ("not_a_server", ("is a int, not a machinery Server", "point -A at the Server")),
        ("add", ("is a Task, not a machinery Server",)),
    ],
)
def test_a_bad_app_attribute_is_one_line(app_dir: str, attr: str, fragments: tuple[str, ...]) -> None:
    assert_one_line_error(invoke(["worker", "-A", f"{app_dir}:{attr}"]), *fragments)


def test_the_app_can_be_named_without_attr_or_as_a_file(app_dir: str, memory_env: dict[str, str]) -> None:
    for spec in (app_dir, f"{app_dir}.py:server"):
        result = invoke(["pending", "-A", spec], memory_env)
        assert result.exit_code == 0, result.output


def test_an_unknown_url_scheme_is_one_line() -> None:
    result = invoke(["pending"], {"BROKER": "nosuch://host/0"})
    assert_one_line_error(result, "'nosuch'", "supported schemes are", "from the environment")


def test_an_unreachable_redis_is_one_line_naming_the_url() -> None:
    for args in (["send", "add", "1"], ["pending"], ["status", "task_x"]):
        result = invoke(args, {"BROKER": "redis://:hunter2@127.0.0.1:1/0"})
        assert_one_line_error(result, "cannot reach redis://***@127.0.0.1:1/0", "is running")
        assert "hunter2" not in result.output


def test_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(invoke(["pending", "--config", str(tmp_path / "missing.yml")]), "cannot read config file")
    bad = tmp_path / "bad.yml"
    bad.write_text("results_expire_in: soon\n")
    assert_one_line_error(invoke(["pending", "--config", str(bad)]), "results_expire_in", "bad.yml")


def test_worker_needs_an_app_and_app_excludes_config(app_dir: str, tmp_path: Path) -> None:
    assert_one_line_error(invoke(["worker"]), "needs -A MODULE:ATTR")
    both = invoke(["pending", "-A", f"{app_dir}:server", "--config", str(tmp_path / "x.yml")])
    assert_one_line_error(both, "not both")


# --------------------------------------------------------------------------- the installed script


def run_script(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MACHINERY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def worker_process(
    args: list[str], env: Mapping[str, str], cwd: Path, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``machinery worker ARGS`` in a subprocess; the test stops it, or it is killed on the way out."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(MACHINERY), "worker", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def stop_gracefully(process: subprocess.Popen[bytes], log_path: Path) -> str:
    """SIGTERM the worker, check it exits 0 having said so, and return its log."""
    process.send_signal(signal.SIGTERM)
    returncode = process.wait(20)
    log = log_path.read_text()
    assert returncode == 0, log
    assert "Worker quit gracefully" in log and "Traceback" not in log, log
    return log


@pytest.mark.slow
def test_send_wait_against_a_worker_process(tmp_path: Path, app_dir: str) -> None:
    env = subprocess_env(BROKER=sqlite_url(tmp_path), DEFAULT_QUEUE="cli_worker")
    log_path = tmp_path / "worker.log"
    # No PYTHONPATH: the worker must find the module in its current directory by itself.
    with worker_process(["-A", f"{app_dir}:server", "-c", "2"], env, tmp_path, log_path) as worker:
        done = run_script(["send", "add", "1", "2", "--wait", "--timeout", "30"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        task_uuid, value = done.stdout.splitlines()
        assert task_uuid.startswith("task_") and value == "3"

        failed = run_script(["send", "boom", "--wait", "--timeout", "30"], env, tmp_path)
        assert failed.returncode == 1
        assert failed.stderr.strip().splitlines() == [f"Error: boom {failed.stdout.strip()} failed: boom went the task"]

        late = run_script(["send", "add", "1", "-Q", "nobody_consumes", "--timeout", "0.5"], env, tmp_path)
        assert late.returncode == 2
        warning, error = late.stderr.strip().splitlines()
        # The worker's heartbeat says what it consumes, so the CLI knows nobody runs this.
        assert warning.startswith("Warning: no live worker runs 'add' from 'nobody_consumes'"), late.stderr
        assert "no result within 0.5 s" in error and "is PENDING" in error and "'nobody_consumes'" in error

        status = run_script(["status", task_uuid], env, tmp_path)
        assert "SUCCESS" in status.stdout and "result   3 (int64)" in status.stdout
        log = stop_gracefully(worker, log_path)
    assert "Launching a worker" in log and "INFO" in log


@pytest.mark.slow
def test_the_examples_run_against_a_worker(tmp_path: Path) -> None:
    env = subprocess_env(BROKER=sqlite_url(tmp_path), DEFAULT_QUEUE="cli_examples")
    log_path = tmp_path / "worker.log"
    with worker_process(["-A", "examples.tasks:server"], env, REPO, log_path) as worker:
        sent = subprocess.run(
            [sys.executable, "-m", "examples.send"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.splitlines() == ["add(1, 1) = 2", "multiply(2, 3) = 6"]
        stop_gracefully(worker, log_path)


@pytest.mark.slow
def test_demo_runs_the_main_job(tmp_path: Path) -> None:
    done = run_script(["demo"], subprocess_env(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "\x1b[" not in out, "piped output must carry no colour codes"
    assert done.stderr == ""
    assert list(tmp_path.iterdir()) == [], "the demo's SQLite file belongs in a temporary directory"

    def result_line(label: str) -> str:
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {label} ") and " = " in line]
        return line

    chain = "PENDING → RECEIVED → STARTED → SUCCESS"
    assert "= 2 " in result_line("add(1, 1)") and result_line("add(1, 1)").endswith(chain)
    assert "= 6 " in result_line("multiply(2, 3)") and result_line("multiply(2, 3)").endswith(chain)
    eta = result_line("add(2, 3)")
    assert "= 5 " in eta and eta.endswith("RECEIVED → STARTED → SUCCESS")
    assert float(eta.split("= 5")[1].split()[0]) >= 1.9  # seconds: it waited for its ETA
    results = out[out.index("Results") :]
    flaky = results[results.index("  flaky()") :].splitlines()
    assert '= "ok on attempt 3"' in flaky[0] and flaky[0].endswith("RETRY")
    assert flaky[1].strip().endswith("RETRY") and flaky[2].strip().endswith("SUCCESS")
    retry_later = results[results.index("  retry_later()") :].splitlines()
    assert '= "ok"' in retry_later[0] and retry_later[0].endswith("RETRY")
    assert retry_later[1].strip().endswith("SUCCESS")

    # Workflows: one line per task under the result, each with its states.
    def task_lines(label: str) -> list[str]:
        lines = results[results.index(f"  {label} ") :].splitlines()
        column = len(lines[1]) - len(lines[1].lstrip())  # where the task lines start
        block = [lines[0], *itertools.takewhile(lambda line: line.startswith(" " * column), lines[1:])]
        return [line[column:] for line in block if not line[column:].startswith(" ")]

    assert "= 48 " in result_line("chain")
    assert [line.split()[0] for line in task_lines("chain")[:3]] == ["add", "add", "multiply"]
    assert "= [2, 10] " in result_line("group")
    assert "= 20 " in result_line("chord")
    assert [line.split()[0] for line in task_lines("chord")[:3]] == ["add", "add", "multiply"]
    for label in ("chain", "group", "chord"):
        assert all(line.endswith("SUCCESS") for line in task_lines(label)[:3]), out

    # The periodic task: three ticks, each sent and run.
    assert "= [1, 2, 3] " in result_line("periodic")
    ticks = [line for line in task_lines("periodic") if line.startswith("tick ")]
    assert len(ticks) == 3 and all(line.endswith(chain) for line in ticks), out
    assert "All 9 examples returned what they should" in out and out.rstrip().endswith("Worker stopped.")


def test_demo_on_an_unreachable_broker_is_one_line() -> None:
    result = invoke(["demo", "--broker", "redis://127.0.0.1:1/0"])
    assert_one_line_error(result, "cannot reach redis://127.0.0.1:1/0")


# --------------------------------------------------------------------------- periodic


@pytest.fixture
def periodic_app(tmp_path: Path, app_dir: str) -> str:
    """The tasks module plus periodic entries (every second, hourly), as another module; its name."""
    name = app_dir + "_periodic"
    (tmp_path / f"{name}.py").write_text(TASKS_MODULE + PERIODIC_LINES)
    return name


def test_worker_runs_the_periodic_scheduler_unless_no_periodic(
    app_dir: str, memory_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[bool] = []
    monkeypatch.setattr(Worker, "launch", lambda self: launched.append(self.periodic))
    assert invoke(["worker", "-A", f"{app_dir}:server"], memory_env).exit_code == 0
    assert invoke(["worker", "-A", f"{app_dir}:server", "--no-periodic"], memory_env).exit_code == 0
    assert invoke(["worker", "-A", f"{app_dir}:server", "--periodic"], memory_env).exit_code == 0
    assert launched == [True, False, True]


def test_periodic_list_shows_the_entries_and_exits(periodic_app: str, memory_env: dict[str, str]) -> None:
    result = invoke(["periodic", "-A", f"{periodic_app}:server", "--list"], memory_env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SPEC", "NEXT", "RUN", "SENDS"]
    every, hourly = lines[1], lines[2]
    assert every.startswith("every_second ") and " task " in every and "@every 1s" in every
    assert "(in " in every and every.endswith("add(1, 2)")
    assert hourly.startswith("hourly_chain ") and " chain " in hourly and hourly.endswith("add(1, 1) -> add(5, 5)")
    assert hourly.split()[3].endswith(":00:00Z")  # the next whole hour
    assert lines[3] == f"2 periodic entries registered by {periodic_app}:server"
    assert result.stderr == ""


def test_periodic_needs_an_app_with_entries(app_dir: str, memory_env: dict[str, str]) -> None:
    assert_one_line_error(invoke(["periodic"], memory_env), "needs -A MODULE:ATTR")
    assert_one_line_error(invoke(["periodic", "-A", f"{app_dir}:server"], memory_env), "registers no periodic tasks")
    listed = invoke(["periodic", "-A", f"{app_dir}:server", "--list"], memory_env)
    assert listed.exit_code == 0 and listed.stdout == f"0 periodic entries registered by {app_dir}:server\n"


@pytest.mark.slow
def test_periodic_process_fires_its_entries_and_stops_on_sigterm(tmp_path: Path, periodic_app: str) -> None:
    env = subprocess_env(BROKER=sqlite_url(tmp_path), DEFAULT_QUEUE="cli_periodic")
    server = Server(Config(broker=sqlite_url(tmp_path), default_queue="cli_periodic"))
    out_path, err_path = tmp_path / "periodic.out", tmp_path / "periodic.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [str(MACHINERY), "periodic", "-A", f"{periodic_app}:server"], cwd=tmp_path, env=env, stdout=out, stderr=err
        )
    try:
        # Nothing consumes the queue: every tick's task waits there.
        def two_sent() -> list[Signature]:
            assert process.poll() is None, err_path.read_text()
            sent = server.get_pending_tasks("cli_periodic")
            return sent if len(sent) >= 2 else []

        sent = wait_until(two_sent, what="two ticks sent")
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        server.close()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert returncode == 0, stdout + stderr
    assert all(s.name == "add" and s.args == [Arg("int64", 1), Arg("int64", 2)] for s in sent)
    assert len({s.uuid for s in sent}) == len(sent), "each tick sends a fresh copy"
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "KIND"]
    assert lines[1].startswith("every_second ") and lines[2].startswith("hourly_chain ")
    assert lines[3] == "Running 2 periodic entries; SIGINT or SIGTERM stops."
    assert "program 'machinery'" in lines[4]
    assert lines[-1] == "Periodic scheduler stopped."
    assert "Periodic task 'every_second' sent" in stderr and "Traceback" not in stderr


# --------------------------------------------------------------------------- groups: send --group, status


def tasks_server(memory_env: Mapping[str, str]) -> Server:
    """A Server on the test's memory broker with the tasks module's tasks."""
    server = Server(Config(broker=memory_env["BROKER"], default_queue="cli_q"))
    exec(TASK_DEFINITIONS, {"server": server})
    return server


def test_send_group_publishes_one_group(memory_env: dict[str, str]) -> None:
    result = invoke(["send", "add", "1", "2", "--group", "3", "--send-concurrency", "1"], memory_env)
    assert result.exit_code == 0, result.output
    group_uuid, summary = result.stdout.splitlines()
    assert group_uuid.startswith("group_") and summary == "Sent 3 add tasks as one group"
    server = Server(Config(broker=memory_env["BROKER"], default_queue="cli_q"))
    sent = server.get_pending_tasks()
    meta = run_sync(server.backend.get_group_meta(group_uuid))
    assert meta is not None and meta.task_uuids == [s.uuid for s in sent]
    assert all(s.group_uuid == group_uuid and s.group_task_count == 3 and s.name == "add" for s in sent)
    assert all(s.args == [Arg("int64", 1), Arg("int64", 2)] for s in sent)

    alone = invoke(["send", "add", "1", "--send-concurrency", "2"], memory_env)
    assert_one_line_error(alone, "--send-concurrency applies to --group N only")
    assert alone.exit_code == 2


def test_send_group_wait_summarises_and_status_lists_the_members(memory_env: dict[str, str]) -> None:
    server = tasks_server(memory_env)
    with running_worker(server):
        good = invoke(["send", "add", "1", "2", "--group", "5", "--wait", "--timeout", "30"], memory_env)
        bad = invoke(["send", "boom", "--group", "2", "--wait", "--timeout", "30"], memory_env)
    assert good.exit_code == 0, good.output
    group_uuid, sent, summary = good.stdout.splitlines()
    assert sent == "Sent 5 add tasks as one group"
    assert summary == "5 succeeded (each returned 3), 0 failed"

    assert bad.exit_code == 1
    assert bad.stdout.splitlines()[-1] == "0 succeeded, 2 failed"
    assert_one_line_error(bad, "2 of 2 tasks of group_", "failed; the first, task_", "boom went the task")

    status = invoke(["status", group_uuid], memory_env)
    assert status.exit_code == 0, status.output
    head, table = status.stdout.split("\n\n")
    fields = dict(line.split(None, 1) for line in head.splitlines())
    assert fields["group"] == group_uuid
    assert fields["members"] == "5 (5 SUCCESS)"
    assert fields["chord"].startswith("not triggered")
    assert fields["created"].endswith("ago)")
    rows = table.splitlines()
    assert rows[0].split() == ["#", "UUID", "TASK", "STATE", "RESULT", "OR", "ERROR"]
    meta = run_sync(server.backend.get_group_meta(group_uuid))
    assert meta is not None
    assert [row.split() for row in rows[1:]] == [
        [str(i), member, "add", "SUCCESS", "3"] for i, member in enumerate(meta.task_uuids, 1)
    ]

    limited = invoke(["status", group_uuid, "--limit", "2"], memory_env).stdout.splitlines()
    assert len([row for row in limited if row.split()[:1] in (["1"], ["2"], ["3"])]) == 2
    assert limited[-1] == "5 members (showing the first 2; --limit 0 shows all)"


def test_status_of_a_chord_shows_the_trigger_and_the_callback(memory_env: dict[str, str]) -> None:
    server = tasks_server(memory_env)
    with running_worker(server):
        chord = Chord(Group(Signature("add", [1, 1]), Signature("boom", [])), Signature("add", []))
        result = server.send_chord(chord)
        with pytest.raises(Exception, match="boom went the task"):
            result.get(10)
        # The callback's FAILURE follows the member's.
        wait_until(lambda: run_sync(server.backend.get_state(result.task_uuid)), what="the callback's FAILURE")
    group = invoke(["status", chord.group.group_uuid], memory_env)
    assert group.exit_code == 0, group.output
    assert "members  2 (1 SUCCESS, 1 FAILURE)" in group.stdout
    assert "chord    triggered" in group.stdout
    assert "  boom  FAILURE  boom went the task" in group.stdout

    callback = invoke(["status", result.task_uuid], memory_env)
    assert callback.exit_code == 0, callback.output
    fields = dict(line.split(None, 1) for line in callback.stdout.splitlines())
    assert fields["state"] == "FAILURE" and fields["error"].startswith("chord member ")
    assert fields["workflow"].startswith("a chord's callback")

    assert_one_line_error(invoke(["status", "chord_nope"], memory_env), "a chord's callback has none until")
    assert_one_line_error(invoke(["status", "group_nope"], memory_env), "no group group_nope", "expired")


@pytest.mark.slow
def test_send_group_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    env = subprocess_env(BROKER=sqlite_url(tmp_path), DEFAULT_QUEUE="cli_progress", TERM="dumb")
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [str(MACHINERY), "send", "add", "1", "--group", "1000"],
            cwd=tmp_path,
            env=env,
            stdout=terminal,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(60) == 0, process.stderr.read() if process.stderr else ""
    finally:
        os.close(controller)
    text = output.decode()
    assert "Publishing 1000 tasks" in text and "100%" in text
    assert "Sent 1000 add tasks as one group" in text
