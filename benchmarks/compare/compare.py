"""machinery beside huey, measured the same way, in interleaved rounds (issue 13's method).

    python benchmarks/compare/compare.py [--rounds 3] [--peer-python /tmp/peers-venv/bin/python]

huey runs from its own virtualenv (``python -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip
install huey==3.5.4 redis``); it is never a dependency of machinery. Each round runs every
measure for every system in turn, so that a noisy machine hits both alike; the table shows the
medians and machinery's ratio to huey, which survives the noise better than either figure.
The "machinery" side imports whatever ``machinery`` the environment gives it: to measure a
commit while editing the working tree, run on a snapshot (``git archive HEAD src | tar -x -C
/tmp/perf-head`` and ``PYTHONPATH=/tmp/perf-head/src python benchmarks/compare/compare.py``).

Measures (Redis on loopback unless said, every task storing its result):
  enqueue     N sync send() calls one at a time, no worker running
  process     N tasks preloaded, then the workers start: N / (last result stored - first execution)
  latency     500 sequential send().get() round trips after 20 warm-up calls, p50 / p99
  sleep       2,000 tasks sleeping 50 ms at concurrency 100, against the ideal 1.0 s
  rss         the worker's peak RSS (VmHWM) in the 1-process run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent


def run(python: str, side: str, *args: str, src: str | None = None) -> dict[str, float]:
    env = dict(os.environ)
    if src:  # another checkout's machinery (the baseline), ahead of the installed one
        env["PYTHONPATH"] = src
    out = subprocess.run(
        [python, str(HERE / side), *args], check=True, capture_output=True, text=True, env=env, timeout=900
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def cleanup(client: redis.Redis, queue: str) -> None:
    keys = [queue, f"{queue}_delayed", f"huey.redis.{queue}", f"huey.results.{queue}", f"huey.schedule.{queue}"]
    keys += list(client.scan_iter(f"machinery:*{queue}*", count=1000))  # with or without a hash tag
    client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-python", default="/tmp/peers-venv/bin/python")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--enqueue-tasks", type=int, default=10_000)
    parser.add_argument("--latency-tasks", type=int, default=500)
    parser.add_argument("--only", nargs="*", default=[], help="measures to run (default: all)")
    parser.add_argument(
        "--baseline-src",
        default="",
        help="the src/ folder of an older machinery (e.g. from `git archive`), measured as a third system",
    )
    args = parser.parse_args()
    ours = sys.executable
    client = redis.Redis()
    sqlite_dir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    results: dict[str, dict[str, list[float]]] = {}

    def note(row: str, system: str, value: float) -> None:
        results.setdefault(row, {}).setdefault(system, []).append(value)
        print(f"  {row}: {system} {value:,.2f}", file=sys.stderr, flush=True)  # kept if a later step fails

    def queue() -> str:
        return f"cmp_{uuid.uuid4().hex[:8]}"

    def wanted(measure: str) -> bool:
        return not args.only or measure in args.only

    mine = [("machinery", None)] + ([("machinery before", args.baseline_src)] if args.baseline_src else [])

    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
        n = str(args.tasks)
        if wanted("enqueue"):
            for system, src in mine:
                q = queue()
                m = run(ours, "side_machinery.py", "enqueue", "--queue", q, "--tasks", str(args.enqueue_tasks), src=src)
                note("enqueue/s", system, m["enqueue_per_s"])
                cleanup(client, q)
            q = queue()
            h = run(args.peer_python, "side_huey.py", "enqueue", "--queue", q, "--tasks", str(args.enqueue_tasks))
            note("enqueue/s", "huey", h["enqueue_per_s"])
            cleanup(client, q)
            q = queue()
            m = run(
                ours,
                "side_machinery.py",
                "enqueue",
                "--queue",
                q,
                "--tasks",
                str(args.enqueue_tasks),
                "--backend",
                "null",
            )
            note("enqueue/s, results off (null backend)", "machinery", m["enqueue_per_s"])
            cleanup(client, q)
        if wanted("process"):
            for procs in (2, 1):
                for system, src in mine:
                    q = queue()
                    m = run(
                        ours,
                        "side_machinery.py",
                        "process",
                        "--queue",
                        q,
                        "--tasks",
                        n,
                        "--processes",
                        str(procs),
                        src=src,
                    )
                    note(f"processing/s, {procs} worker process(es)", system, m["processing_per_s"])
                    if procs == 1:
                        note("worker peak RSS MB (1 process)", system, m["rss_mb"])
                    cleanup(client, q)
                q = queue()
                kind = "process" if procs == 2 else "thread"
                h = run(
                    args.peer_python,
                    "side_huey.py",
                    "process",
                    "--queue",
                    q,
                    "--tasks",
                    n,
                    "--workers",
                    str(procs if procs == 2 else 8),
                    "--kind",
                    kind,
                )
                note(f"processing/s, {procs} worker process(es)", "huey", h["processing_per_s"])
                if procs == 1:
                    note("worker peak RSS MB (1 process)", "huey", h["rss_mb"])
                cleanup(client, q)
        if wanted("latency"):
            sides = [(system, ours, "side_machinery.py", src) for system, src in mine]
            for system, python, side, src in [*sides, ("huey", args.peer_python, "side_huey.py", None)]:
                q = queue()
                lat = run(python, side, "latency", "--queue", q, "--tasks", str(args.latency_tasks), src=src)
                note("round trip p50 ms", system, lat["p50_ms"])
                note("round trip p99 ms", system, lat["p99_ms"])
                cleanup(client, q)
        if wanted("sleep"):
            for system, src in mine:
                q = queue()
                sleep_args = ["--tasks", "2000", "--processes", "1", "--concurrency", "100"]
                m = run(ours, "side_machinery.py", "sleep", "--queue", q, *sleep_args, src=src)
                note("2,000 x 50 ms sleeps at concurrency 100 (x ideal 1.0 s)", system, m["sleep_s"])
                cleanup(client, q)
            q = queue()
            h = run(
                args.peer_python,
                "side_huey.py",
                "sleep",
                "--queue",
                q,
                "--tasks",
                "2000",
                "--workers",
                "100",
                "--kind",
                "thread",
            )
            note("2,000 x 50 ms sleeps at concurrency 100 (x ideal 1.0 s)", "huey", h["sleep_s"])
            cleanup(client, q)
        if wanted("sqlite"):
            for system, src in [*mine, ("huey", None)]:
                db = sqlite_dir / f"{system.replace(' ', '-')}-{round_no}.db"
                q = queue()
                if system != "huey":
                    common = ["--queue", q, "--broker", f"sqlite:///{db}"]
                    lat = run(
                        ours, "side_machinery.py", "latency", *common, "--tasks", str(args.latency_tasks), src=src
                    )
                    proc = run(
                        ours, "side_machinery.py", "process", *common, "--tasks", "5000", "--processes", "1", src=src
                    )
                else:
                    common = ["--queue", q, "--storage", "sqlite", "--sqlite", str(db)]
                    lat = run(args.peer_python, "side_huey.py", "latency", *common, "--tasks", str(args.latency_tasks))
                    proc = run(
                        args.peer_python,
                        "side_huey.py",
                        "process",
                        *common,
                        "--tasks",
                        "5000",
                        "--workers",
                        "8",
                        "--kind",
                        "thread",
                    )
                note("SQLite round trip p50 ms", system, lat["p50_ms"])
                note("SQLite processing/s (1 worker process)", system, proc["processing_per_s"])
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores)")
    columns = [system for system, _ in mine] + ["huey"]
    print(f"| measure (medians of {args.rounds} interleaved rounds) | " + " | ".join(columns) + " | machinery / huey |")
    print("|---|" + "---:|" * (len(columns) + 1))

    def shown(value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"

    for row, systems in results.items():
        medians = {system: statistics.median(values) for system, values in systems.items()}
        ratio = medians["machinery"] / medians["huey"] if "huey" in medians and "machinery" in medians else None
        cells = " | ".join(shown(medians.get(system)) for system in columns)
        print(f"| {row} | {cells} | {shown(ratio) if ratio is None or ratio >= 100 else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main()
