"""memcached servers of our own, on free loopback ports, stopped by the PID we recorded."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from support.redis_topologies import free_ports

START_TIMEOUT = 30.0


@dataclass
class Memcached:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"memcache://127.0.0.1:{self.port}"

    def meta_get(self, key: str) -> tuple[int, int, bytes] | None:
        """(seconds left to live, flags, value) of ``key`` as memcached holds it, or None:
        the meta-protocol ``mg <key> t f v``, read straight off the server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"mg {key} t f v\r\n".encode())
            reply = b""
            while not (reply.startswith(b"EN\r\n") or (reply.startswith(b"VA ") and reply.count(b"\r\n") >= 2)):
                chunk = sock.recv(65536)
                assert chunk, f"memcached closed the connection after {reply!r}"
                reply += chunk
        if reply.startswith(b"EN"):
            return None
        header, _, rest = reply.partition(b"\r\n")
        flags = {word[:1]: word[1:] for word in header.split()[2:]}
        return int(flags[b"t"]), int(flags[b"f"]), rest[: int(header.split()[1])]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def memcached() -> Iterator[Memcached]:
    """``memcached -l 127.0.0.1 -p PORT -U 0`` (TCP only), torn down on exit."""
    binary = shutil.which("memcached")
    assert binary is not None
    [port] = free_ports(1)
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-u", "root"]
    server = Memcached(port, subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memcached did not start on port {port}") from None
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


def _require_memcached() -> None:
    from support.services import IN_CI

    if shutil.which("memcached") is None:
        message = "memcached is not installed (Debian package memcached)"
        if IN_CI:
            pytest.fail(message + "; .ci/run installs it", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[Memcached]:
    """One memcached for the session."""
    _require_memcached()
    with memcached() as server:
        yield server


@pytest.fixture
def memcached_pair() -> Iterator[tuple[Memcached, Memcached]]:
    """Two memcached servers of this test's own, for the choice of server per key."""
    _require_memcached()
    with memcached() as first, memcached() as second:
        yield first, second
