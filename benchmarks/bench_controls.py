"""What the task controls cost on the hot path: send and drain rates of no-op tasks, with no
control set and with each control set, on one broker (the in-process memory broker by default,
so that the figures are our own CPU time rather than a server's round trips).

    python benchmarks/bench_controls.py [--broker URL] [--tasks N] [--repeat R] [--cases a,b]

Cases: ``none`` (an ``async def`` no-op, nothing set), ``def_threads`` (a ``def`` no-op on the
threads), and with one control each: ``time_limit``, ``soft_time_limit``, ``rate_limit``
(``"1000000/s"``: the booking, never a wait), ``unique`` (``unique_for`` on every send),
``progress`` (one ``ctx.progress`` per task), ``priority`` (``priority=5``), ``def_processes``
(a ``def`` no-op in the process pool). ``none`` and ``def_threads`` run on any version of
machinery, so the same script measures a checkout from before the controls:

    git archive 3b96be7 src | tar -x -C /tmp/machinery-before
    PYTHONPATH=/tmp/machinery-before/src python benchmarks/bench_controls.py --cases none,def_threads
    PYTHONPATH=/tmp/machinery-before/src python benchmarks/bench_controls.py --cases none,def_threads --calls

Each case runs ``repeat`` times, interleaved with the others; the median and the range are
printed. The drain counts from the first task's start to the last task's end. The CPU time
per send and per task is this process's (every thread of it): on a shared machine it moves
far less than the rates, so it is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_control_tasks as tasks

from machinery import Config, RedisConfig, Server, Signature

ALL_CASES = [
    "none",
    "def_threads",
    "time_limit",
    "soft_time_limit",
    "rate_limit",
    "unique",
    "progress",
    "priority",
    "def_processes",
]


def make_server(broker: str, queue: str) -> Server:
    url = f"memory://{queue}" if broker == "memory" else broker
    return Server(Config(broker=url, default_queue=queue, redis=RedisConfig(delayed_tasks_key=f"{queue}_delayed")))


def register(server: Server, case: str) -> tuple[str, dict[str, Any], str]:
    """Register the case's task; returns (task name, send options, pool)."""
    if case in ("def_threads", "def_processes"):
        server.register_tasks({"noop": tasks.noop_def})
        return "noop", {}, "processes" if case == "def_processes" else "threads"
    if case in ("time_limit", "soft_time_limit", "rate_limit"):
        options = {"time_limit": 60.0, "soft_time_limit": 60.0, "rate_limit": "1000000/s"}
        server.register_task("noop", tasks.noop, **{case: options[case]})  # type: ignore[arg-type]
        return "noop", {}, "threads"
    if case == "progress":
        server.register_tasks({"noop": tasks.noop_progress})
        return "noop", {}, "threads"
    server.register_tasks({"noop": tasks.noop})
    if case == "unique":
        return "noop", {"unique_for": 600.0}, "threads"
    if case == "priority":
        return "noop", {"priority": 5}, "threads"
    return "noop", {}, "threads"


def signature(name: str, i: int, options: dict[str, Any]) -> Signature:
    controls = {k: v for k, v in options.items() if k != "priority"}
    made = Signature(name, [i], priority=options.get("priority", 0))
    if controls:
        from machinery.controls import apply_send_options

        made = apply_send_options(made, controls)
    return made


async def run_case(broker: str, case: str, count: int, concurrency: int) -> tuple[float, float, float, float]:
    """Sends per second, drained tasks per second, and this process's CPU time per send and
    per drained task (µs; all its threads, so other processes' load hardly changes it), of
    one run of ``case``."""
    queue = f"bench_controls_{uuid.uuid4().hex[:8]}"
    server = make_server(broker, queue)
    name, options, pool = register(server, case)
    signatures = [signature(name, i, options) for i in range(count)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for begin in range(0, count, 100):  # 100 sends in flight, as a busy client would have
        await asyncio.gather(*(server.asend_task(s) for s in signatures[begin : begin + 100]))
    send_rate = count / (time.perf_counter() - started)
    send_cpu = (time.process_time() - cpu_started) / count * 1e6

    kwargs: dict[str, Any] = {"pool": pool} if pool != "threads" else {}
    worker = server.new_worker("bench", 4 if pool == "processes" else concurrency, periodic=False, **kwargs)
    marks: dict[str, float] = {}
    done = 0
    finished = asyncio.Event()
    loop = asyncio.get_running_loop()

    def before(_: Signature) -> None:
        if "first" not in marks:
            marks["first"], marks["first_cpu"] = time.perf_counter(), time.process_time()

    def after(_: Signature) -> None:
        nonlocal done
        done += 1
        if done == count:
            marks["last"], marks["last_cpu"] = time.perf_counter(), time.process_time()
            loop.call_soon_threadsafe(finished.set)

    worker.set_pre_task_handler(before)
    worker.set_post_task_handler(after)
    running = asyncio.ensure_future(worker.arun())
    await finished.wait()
    worker.quit()
    await running
    if broker != "memory":
        await server.broker.delete_queue(queue)
    await server.aclose()
    drain_cpu = (marks["last_cpu"] - marks["first_cpu"]) / count * 1e6
    return send_rate, count / (marks["last"] - marks["first"]), send_cpu, drain_cpu


def summary(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):>7,.0f} {unit} ({min(values):,.0f} - {max(values):,.0f})"


async def count_calls(broker: str, cases: list[str], count: int, concurrency: int) -> None:
    import cProfile
    import pstats

    print(f"{'case':<16} Python calls per task (send + drain, event loop thread)")
    for case in cases:
        await run_case(broker, case, min(count, 1000), concurrency)  # warm: imports, first connections
        profile = cProfile.Profile()
        profile.enable()
        await run_case(broker, case, count, concurrency)
        profile.disable()
        calls = sum(nc for (_, nc, _, _, _) in pstats.Stats(profile).stats.values())
        print(f"{case:<16} {calls / count:8.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="memory", help="memory (the default) or a broker URL")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(ALL_CASES))
    parser.add_argument(
        "--calls",
        action="store_true",
        help="instead, count the Python function calls per task (send and drain, on the event loop's thread) "
        "under cProfile: a figure that does not move with the machine's load",
    )
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; the cases are {', '.join(ALL_CASES)}")
    import machinery

    print(f"machinery from {machinery.__file__}; broker {args.broker}; {args.tasks} tasks x {args.repeat} runs")
    if args.calls:
        await count_calls(args.broker, cases, args.tasks, args.concurrency)
        return
    figures: dict[str, list[list[float]]] = {c: [[], [], [], []] for c in cases}
    for _ in range(args.repeat):
        for case in cases:  # interleaved, so that a noisy neighbour spreads over every case
            measured = await run_case(args.broker, case, args.tasks, args.concurrency)
            for column, value in zip(figures[case], measured, strict=True):
                column.append(value)
    print(f"{'case':<16} {'send':<26} {'drain':<26} {'CPU per send':<24} CPU per task")
    for case in cases:
        sends, drains, send_cpu, drain_cpu = figures[case]
        print(
            f"{case:<16} {summary(sends, '/s'):<26} {summary(drains, '/s'):<26} "
            f"{summary(send_cpu, 'µs'):<24} {summary(drain_cpu, 'µs')}"
        )


if __name__ == "__main__":
    asyncio.run(main())
