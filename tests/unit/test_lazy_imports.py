"""A worker loads only what it uses: the process pool's multiprocessing, the config file's
YAML parser and the cron parser are imported by the processes that need them (each costs
RSS in every worker process: benchmarks/RESULTS.md)."""

import subprocess
import sys

WORKER = """
import sys
from machinery import Config, Server
server = Server(Config(broker="redis://127.0.0.1:6379/9", default_queue="lazy_imports"))
server.new_worker("lazy", 4, periodic=False)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_a_worker_without_a_pool_a_config_file_or_a_cron_schedule_loads_none_of_them() -> None:
    loaded = set(
        subprocess.run([sys.executable, "-c", WORKER], check=True, capture_output=True, text=True).stdout.split()
    )
    assert "machinery" in loaded  # the script did run
    assert not loaded & {"multiprocessing", "yaml", "croniter", "dateutil"}
