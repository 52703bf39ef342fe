"""Worker processes for the task-control tests, and the app the CLI tests point ``-A`` at.

``server`` is configured from the environment as any app would be (``BROKER``,
``DEFAULT_QUEUE``, ``REDIS_DELAYED_TASKS_KEY``...) and has every task of ``control_tasks``.

python -m support.control_procs worker [--pool threads|processes] [--concurrency N] [--time-limit S]
    Runs one worker of ``server`` until SIGINT/SIGTERM (the second one aborts), logging to
    stderr at INFO.
"""

from __future__ import annotations

import argparse
import logging
import sys

from machinery import Config, Server

from .control_tasks import register

server = Server(Config.from_env())
register(server)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="control_procs")
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(message)s", stream=sys.stderr)
    worker = server.new_worker(concurrency=args.concurrency, periodic=False, pool=args.pool, time_limit=args.time_limit)
    worker.launch()


if __name__ == "__main__":
    main(sys.argv[1:])
