"""Redis Cluster and Sentinel deployments of our own, for the tests that need one.

Each server is a ``redis-server`` child process on a free loopback port, stopped by the PID we
recorded when the deployment is torn down (never by name). A deployment lives in a temporary
folder of its own: the cluster's ``nodes-<port>.conf`` files and the Sentinels' configuration
files (which Sentinel rewrites) stay there.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from machinery import RedisConfig

START_TIMEOUT = 60.0
#: Short, so that a replica takes over within a few seconds of its primary's death.
CLUSTER_NODE_TIMEOUT_MS = 2000
SENTINEL_DOWN_AFTER_MS = 1000
MASTER_NAME = "mymaster"
#: The deployment has passwords, as production ones do: one for the primary and its replica,
#: another for the Sentinels (RedisConfig.sentinel_password).
PRIMARY_PASSWORD = "primary-secret"
SENTINEL_PASSWORD = "sentinel-secret"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_ports(count: int, with_bus: bool = False) -> list[int]:
    """``count`` free loopback ports (and, with ``with_bus``, port + 10000 free too: a cluster
    node's bus port)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port in ports or (with_bus and (port + 10000 > 65535 or not _port_free(port + 10000))):
            continue
        ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(predicate: object, what: str, timeout: float = START_TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not happen within {timeout} s (last error: {last})")


@dataclass
class RedisProcess:
    """One redis-server (or Sentinel) we started."""

    port: int
    process: subprocess.Popen[bytes]
    role: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crashed server dies: nothing is flushed, no client is told."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    password: str | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)


def _start(args: list[str], port: int, role: str, folder: Path, password: str | None = None) -> RedisProcess:
    log = open(folder / f"{role}-{port}.log", "wb")  # noqa: SIM115  (kept open for the child's life)
    process = subprocess.Popen(args, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    node = RedisProcess(port, process, role, password)
    _wait(lambda: not node.alive() or node.client().ping(), f"{role} on port {port} answering")
    if not node.alive():
        raise RuntimeError(f"{role} on port {port} exited: {(folder / f'{role}-{port}.log').read_text()[-2000:]}")
    return node


def _server_args(port: int, *extra: str) -> list[str]:
    binary = redis_server_binary()
    assert binary is not None
    return [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        # A replica syncs at once rather than after the default 5 s of waiting for company.
        *("--repl-diskless-sync-delay", "0"),
        *extra,
    ]


@dataclass
class RedisClusterDeployment:
    """Three primaries and three replicas, seeded from every node."""

    nodes: list[RedisProcess]
    folder: Path
    processes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def redis_config(self, **fields: object) -> RedisConfig:
        return RedisConfig(cluster_enabled=True, **fields)  # type: ignore[arg-type]

    def client(self) -> RedisCluster:
        """A synchronous cluster client, for the test's own inspection."""
        alive = next(node for node in self.nodes if node.alive())
        return RedisCluster(host="127.0.0.1", port=alive.port, socket_timeout=5)

    def primary_of(self, key: str) -> RedisProcess:
        """The node that serves ``key``'s slot now."""
        with self.client() as client:
            node = client.get_node_from_key(key)
            port = int(node.port)
        return next(n for n in self.nodes if n.port == port)

    def replicate_everything(self) -> None:
        """Until every replica holds every write made so far: on each primary, a write of our
        own and ``WAIT`` for it on the same connection (replication keeps each primary's order)."""
        with self.client() as cluster:
            primaries = {int(node.port) for node in cluster.get_primaries()}
            probes: dict[int, str] = {}
            for n in itertools.count():
                if len(probes) == len(primaries):
                    break
                key = f"replication_probe_{n}"
                probes.setdefault(int(cluster.get_node_from_key(key).port), key)
        for node in self.nodes:
            if node.port in probes:
                pipe = node.client().pipeline(transaction=False)
                pipe.set(probes[node.port], "1", ex=60)
                pipe.wait(1, int(START_TIMEOUT * 1000))
                _, acked = pipe.execute()
                assert acked >= 1, f"the replica of 127.0.0.1:{node.port} did not acknowledge"

    def wait_healthy(self) -> None:
        """Until every live node sees all slots served and every replica is in sync."""

        def healthy() -> bool:
            for node in self.nodes:
                if not node.alive():
                    continue
                if node.client().cluster("INFO").get("cluster_state") != "ok":
                    return False
                replication = node.client().info("replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True

        _wait(healthy, "the cluster settling")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def redis_cluster(folder: Path) -> Iterator[RedisClusterDeployment]:
    """A 6-node cluster (3 primaries, 3 replicas) in ``folder``, torn down on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes: list[RedisProcess] = []
    deployment = RedisClusterDeployment(nodes, folder)
    try:
        for port in free_ports(6, with_bus=True):
            args = _server_args(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(CLUSTER_NODE_TIMEOUT_MS),
                # A replica may take over however long ago it heard from its primary.
                "--cluster-replica-validity-factor",
                "0",
            )
            nodes.append(_start(args, port, "cluster-node", folder))
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli is needed to create a cluster"
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        deployment.wait_healthy()
        yield deployment
    finally:
        deployment.stop()


@dataclass
class RedisSentinelDeployment:
    """One primary, one replica, three Sentinels watching them as ``mymaster``."""

    servers: list[RedisProcess]
    sentinels: list[RedisProcess]
    folder: Path

    @property
    def url(self) -> str:
        """The Sentinels' addresses, with the primary's password (Go's form)."""
        return f"redis://:{PRIMARY_PASSWORD}@" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def redis_config(self, **fields: object) -> RedisConfig:
        return RedisConfig(master_name=MASTER_NAME, sentinel_password=SENTINEL_PASSWORD, **fields)  # type: ignore[arg-type]

    def primary(self) -> RedisProcess:
        """The server the Sentinels name as primary now."""
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            with suppress(redis.RedisError, OSError):
                address: Any = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
                return next(s for s in self.servers if s.port == int(address[1]))
        raise RuntimeError("no Sentinel names a primary")

    def client(self) -> redis.Redis:
        return self.primary().client()

    def wait_healthy(self) -> None:
        """Until each Sentinel knows the primary, its replica and the other two Sentinels,
        and the replica is in sync: only then can a failover be agreed on."""

        def healthy() -> bool:
            primary = self.primary()
            if not primary.alive():
                return False
            for sentinel in self.sentinels:
                masters: Any = sentinel.client().sentinel_masters()
                state = masters.get(MASTER_NAME)
                if not state or int(state["port"]) != primary.port:
                    return False
                if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
                if int(state.get("num-slaves", 0)) < 1:
                    return False
            info = primary.client().info("replication")
            return int(info.get("connected_slaves", 0)) >= 1

        _wait(healthy, "the Sentinels agreeing on a primary with a replica")

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()


@contextmanager
def redis_sentinel(folder: Path) -> Iterator[RedisSentinelDeployment]:
    """A primary, a replica and three Sentinels in ``folder``, torn down on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    primary_port, replica_port, *sentinel_ports = free_ports(5)
    deployment = RedisSentinelDeployment([], [], folder)
    try:
        auth = ("--requirepass", PRIMARY_PASSWORD, "--masterauth", PRIMARY_PASSWORD)
        deployment.servers.append(
            _start(_server_args(primary_port, *auth), primary_port, "primary", folder, PRIMARY_PASSWORD)
        )
        deployment.servers.append(
            _start(
                _server_args(replica_port, *auth, "--replicaof", "127.0.0.1", str(primary_port)),
                replica_port,
                "replica",
                folder,
                PRIMARY_PASSWORD,
            )
        )
        for port in sentinel_ports:
            conf = folder / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {SENTINEL_DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                f"sentinel auth-pass {MASTER_NAME} {PRIMARY_PASSWORD}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            )
            binary = redis_server_binary()
            assert binary is not None
            sentinel = _start([binary, str(conf), "--sentinel"], port, "sentinel", folder, SENTINEL_PASSWORD)
            deployment.sentinels.append(sentinel)
        deployment.wait_healthy()
        yield deployment
    finally:
        deployment.stop()


def _require_redis_server() -> None:
    from support.services import IN_CI

    if redis_server_binary() is None or shutil.which("redis-cli") is None:
        message = "redis-server and redis-cli are needed to start a Redis Cluster or Sentinel deployment"
        if IN_CI:
            pytest.fail(message + "; .ci/run installs redis-server", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_cluster_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterDeployment]:
    """One cluster for the session's tests that do not break it (failover tests start their own)."""
    _require_redis_server()
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_sentinel_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelDeployment]:
    """One Sentinel deployment for the session's tests that do not fail it over."""
    _require_redis_server()
    with redis_sentinel(tmp_path_factory.mktemp("redis-sentinel")) as deployment:
        yield deployment


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterDeployment]:
    """A cluster of this test's own, to kill nodes of."""
    _require_redis_server()
    with redis_cluster(tmp_path / "cluster") as deployment:
        yield deployment


@pytest.fixture
def own_redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelDeployment]:
    """A Sentinel deployment of this test's own, to fail over."""
    _require_redis_server()
    with redis_sentinel(tmp_path / "sentinel") as deployment:
        yield deployment
