"""The helper processes of the multi-process tests: ``python -m support.procs MODE CONFIG_JSON ARGS``.

``CONFIG_JSON`` is a Config as ``config_json`` writes it, so a helper works on whichever
deployment the test runs on. Every mode prints ``READY`` once it is under way (a worker once it
takes messages); the test waits for that line, not for a guessed time (``Processes.start``).

Modes:
  worker [--concurrency N] [--record PATH] [--periodic]
      A worker of ``APP_TASKS``; callbacks write to the ``FileRecord`` at PATH. SIGTERM drains.
  periodic --spec SPEC --name NAME
      A periodic-only scheduler sending ``NAME`` on SPEC; prints ``FIRED <unix s>`` per tick it sent.
  consume --idle SECONDS
      Takes and acks messages until none came for SECONDS; prints the bodies taken as one JSON list.
  send --base B --count N
      Sends ``add(B, i)`` for i < N; prints ``[uuid, B + i]`` per task, one JSON line each.
  race --group G --key K --at UNIX_S
      At UNIX_S, triggers G's chord (one member) and takes lock K; prints what it won as JSON.
  complete --uuid U
      Writes RECEIVED then SUCCESS (add, 3) for U through the result backend.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from machinery import RECEIVED, SUCCESS, Arg, Config, Server, Signature, TaskResult, TaskState

from .recording import FileRecord

READY = "READY"


def config_json(config: Config) -> str:
    """``config`` as one JSON text (sections as objects) that ``config_from_json`` reads back."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    encoded = {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
        for k, v in fields.items()
    }
    return json.dumps(encoded)


def config_from_json(text: str) -> Config:
    data = json.loads(text)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.default_factory is not dataclasses.MISSING:  # a section: RedisConfig, AMQPConfig...
            section = f.default_factory()
            value = type(section)(**value)
        values[f.name] = value
    return Config(**values)


def ready() -> None:
    print(READY, flush=True)


# ------------------------------------------------------------------------------ the worker's tasks


def register_app_tasks(server: Server, record: FileRecord | None) -> None:
    """The tasks every helper worker knows (the in-process tests register their own)."""

    def note(entry: dict[str, Any]) -> None:
        if record is not None:
            record.add(entry)

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    @server.task
    def hang(*args: Any) -> None:
        """Notes that it started (with this process's pid) and never finishes: for SIGKILL tests."""
        note({"task": "hang", "pid": os.getpid(), "args": list(args)})
        time.sleep(3600)

    @server.task
    def slow(marker: str) -> str:
        """Hangs on its first run only (it leaves ``marker``); any later run completes."""
        if not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            time.sleep(3600)
        return "done"

    @server.task
    def stress_member(value: int) -> int:
        return value

    @server.task
    def stress_callback(chord: str, *results: int) -> int:
        note({"chord": chord, "results": list(results)})
        return sum(results)


def worker(server: Server, args: argparse.Namespace) -> None:
    register_app_tasks(server, FileRecord(args.record) if args.record else None)
    the_worker = server.new_worker(concurrency=args.concurrency, periodic=args.periodic)

    def say_ready() -> None:
        if the_worker.started.wait(120):
            ready()

    threading.Thread(target=say_ready, daemon=True).start()
    the_worker.launch()


def periodic(server: Server, args: argparse.Namespace) -> None:
    server.register_periodic_task(args.spec, args.name, Signature(args.name, []))
    # One line per tick this process won and sent, for the test to count.
    server.periodic.on_fire = lambda entry, tick: print("FIRED", int(tick.timestamp()), flush=True)
    ready()
    server.run_periodic()


async def consume(server: Server, args: argparse.Namespace) -> None:
    consumer = await server.broker.open_consumer(server.config.default_queue, f"proc{os.getpid()}")
    ready()
    taken: list[str] = []
    while True:
        deliveries = await consumer.fetch(3, args.idle)
        if not deliveries:
            break
        for delivery in deliveries:
            taken.append(delivery.body.decode())
            await consumer.ack(delivery)
    await consumer.close()
    print(json.dumps(taken), flush=True)
    await server.aclose()


def send(server: Server, args: argparse.Namespace) -> None:
    ready()
    for i in range(args.count):
        result = server.send_task(Signature("add", [Arg("int64", args.base), Arg("int64", i)]))
        print(json.dumps([result.task_uuid, args.base + i]), flush=True)


async def race(server: Server, args: argparse.Namespace) -> None:
    ready()
    await asyncio.sleep(max(0.0, args.at - time.time()))
    chord = await server.backend.trigger_chord(args.group, 1)
    locked = await server.lock.try_lock(args.key, time.time_ns() + 60 * 10**9)
    print(json.dumps({"chord": chord, "lock": locked}), flush=True)
    await server.aclose()


async def complete(server: Server, args: argparse.Namespace) -> None:
    ready()
    await server.backend.write_states([TaskState(args.uuid, RECEIVED, "add")], True)
    await server.backend.write_states([TaskState(args.uuid, SUCCESS, "add", [TaskResult("int64", 3)])], True)
    await server.aclose()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m support.procs", description=__doc__.split("\n")[0])
    modes = top.add_subparsers(dest="mode", required=True)
    w = modes.add_parser("worker")
    w.add_argument("--concurrency", type=int, default=4)
    w.add_argument("--record", default="")
    w.add_argument("--periodic", action="store_true")
    p = modes.add_parser("periodic")
    p.add_argument("--spec", default="@every 1s")
    p.add_argument("--name", default="tick")
    c = modes.add_parser("consume")
    c.add_argument("--idle", type=float, default=1.0)
    s = modes.add_parser("send")
    s.add_argument("--base", type=int, required=True)
    s.add_argument("--count", type=int, required=True)
    r = modes.add_parser("race")
    r.add_argument("--group", required=True)
    r.add_argument("--key", required=True)
    r.add_argument("--at", type=float, required=True)
    d = modes.add_parser("complete")
    d.add_argument("--uuid", required=True)
    for sub in (w, p, c, s, r, d):
        sub.add_argument("config", help="the Config as JSON (support.procs.config_json)")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{args.mode} {os.getpid()}] %(levelname)s %(message)s")
    server = Server(config_from_json(args.config))
    try:
        if args.mode == "worker":
            worker(server, args)
        elif args.mode == "periodic":
            periodic(server, args)
        elif args.mode == "consume":
            asyncio.run(consume(server, args))
        elif args.mode == "send":
            send(server, args)
        elif args.mode == "race":
            asyncio.run(race(server, args))
        elif args.mode == "complete":
            asyncio.run(complete(server, args))
    finally:
        server.close()


if __name__ == "__main__":
    main(sys.argv[1:])
