"""Processes for the multi-process workflow tests (run as a script, never collected by pytest).

python _workflow_procs.py worker <broker url> <queue> <record>
    A worker whose ``stress_callback`` task records each execution in <record>: a Redis
    list key when the broker is Redis, else a SQLite file. Stops on SIGTERM.
python _workflow_procs.py periodic <broker url> <queue>
    A periodic-only scheduler sending ``tick`` on ``@every 1s``; prints ``FIRED <tick>``
    for each tick it sent. Stops on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
from typing import Any

from machinery import Config, RedisConfig, Server, Signature


def make_server(url: str, queue: str) -> Server:
    redis = RedisConfig(
        delayed_tasks_key=f"{queue}_delayed", normal_tasks_poll_period=200, delayed_tasks_poll_period=100
    )
    return Server(Config(broker=url, default_queue=queue, redis=redis))


class CallbackLog:
    """Appends one JSON record per callback execution to a store the test process reads.

    (The in-process counterpart, for tasks on the test's own worker thread, is ``helpers.Recorder``.)
    """

    def __init__(self, url: str, target: str) -> None:
        self.url, self.target = url, target
        self.local = threading.local()

    def record(self, payload: dict[str, Any]) -> None:
        text = json.dumps(payload)
        if self.url.startswith("redis"):
            client = getattr(self.local, "client", None)
            if client is None:
                import redis

                client = self.local.client = redis.Redis.from_url(self.url)
            client.rpush(self.target, text)
            return
        with sqlite3.connect(self.target, timeout=60) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS calls (payload TEXT NOT NULL)")
            conn.execute("INSERT INTO calls (payload) VALUES (?)", (text,))


def worker(url: str, queue: str, target: str) -> None:
    server = make_server(url, queue)
    callbacks = CallbackLog(url, target)

    @server.task
    def stress_member(value: int) -> int:
        return value

    @server.task
    def stress_callback(chord: str, *results: int) -> int:
        callbacks.record({"chord": chord, "results": list(results)})
        return sum(results)

    server.new_worker(concurrency=8, periodic=False).launch()


def periodic(url: str, queue: str) -> None:
    server = make_server(url, queue)
    server.register_periodic_task("@every 1s", "tick", Signature("tick", []))
    # One line per tick this process won and sent, for the test to count.
    server.periodic.on_fire = lambda entry, tick: print("FIRED", int(tick.timestamp()), flush=True)
    server.run_periodic()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format=f"[{sys.argv[1]}] %(levelname)s %(message)s")
    if sys.argv[1] == "worker":
        worker(*sys.argv[2:5])
    elif sys.argv[1] == "periodic":
        periodic(*sys.argv[2:4])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
