"""The instructions one sync send costs the sending process, counted by callgrind (so that a
busy machine does not change the figure):

    for n in 50 250; do valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \\
        python benchmarks/bench_send_cost.py $n 2>&1 | grep Collected; done

(the difference of the two counts divided by 200 is the cost of one send; both threads count).
Broker and backend: $BROKER, by default the Redis on loopback.
"""

from __future__ import annotations

import os
import sys
import uuid

from machinery import Config, Server, Signature


def main() -> None:
    count = int(sys.argv[1])
    queue = f"bench_send_cost_{uuid.uuid4().hex[:8]}"
    server = Server(Config(broker=os.environ.get("BROKER", "redis://127.0.0.1:6379/0"), default_queue=queue))
    for _ in range(30):  # connections, scripts and code paths warm
        server.send_task(Signature("work", [1]))
    for i in range(count):
        server.send_task(Signature("work", [i]))
    server.close()


if __name__ == "__main__":
    main()
