"""Cross-process wake-ups for one SQLite database file, so waiting needs no fast poll.

SQLite tells no other connection that a commit happened: a reader must look (``PRAGMA
data_version``). Polling that every 2 ms made a round trip between a client and a worker in
two processes cost about two polls. Instead, every process that waits on a file listens on a
Unix datagram socket of its own, and every process that commits a write to the file sends
each listener one empty datagram afterwards: the listener's watcher thread wakes at once and
looks at ``data_version`` as before. The datagram carries no data, so a lost, late or foreign
one costs at most one needless look; the watcher still polls slowly as the safety net (a
writer that does not know of a listener yet, an older machinery, another program).

The sockets live in Linux's abstract namespace (no file to clean up, no path-length limit);
each listener announces itself with an empty marker file named after its socket in the
directory ``<database>-wake/`` beside the database, as SQLite keeps ``-wal`` and ``-shm``
there. A writer lists that directory again whenever its modification time changes, and
removes the marker of a listener that no longer exists (its process died). Elsewhere than on
Linux there is no channel and the watcher polls as it always did.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import sys
import time
import uuid
from contextlib import suppress

from .. import log

#: Seconds after which a writer lists the listeners again even if the directory looks unchanged
#: (a modification time can repeat within the file system's granularity).
PEERS_REFRESH = 1.0
_PREFIX = "machinery-sqlite-"


def supported() -> bool:
    """Whether this platform has the abstract socket namespace the channel uses."""
    return sys.platform.startswith("linux")


class WakeChannel:
    """One database file's wake-up channel, as seen from one process (listener and sender)."""

    def __init__(self, db_path: str) -> None:
        self.directory = f"{db_path}-wake"
        self._key = hashlib.sha1(db_path.encode()).hexdigest()[:16]
        self._listener: socket.socket | None = None
        self.name: str | None = None  # our own socket's name, while listening
        self._sender: socket.socket | None = None
        self._peers: list[str] = []
        self._peers_mtime: int | None = None
        self._peers_at = 0.0

    # ------------------------------------------------------------------ listening

    def listen(self) -> bool:
        """Start listening; False (and a debug line) if the channel cannot be set up here."""
        if self._listener is not None:
            return True
        name = f"{_PREFIX}{self._key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"\0{name}")
            sock.setblocking(False)
            os.makedirs(self.directory, exist_ok=True)
            with open(os.path.join(self.directory, name), "x"):
                pass
        except OSError as exc:
            sock.close()
            log.logger.debug("SQLite wake-up channel %s unavailable (%s); polling instead", self.directory, exc)
            return False
        self._listener, self.name = sock, name
        return True

    def wait(self, timeout: float) -> bool:
        """Block until a wake-up arrives (True) or ``timeout`` seconds pass (False); consume
        what has arrived."""
        sock = self._listener
        if sock is None:
            time.sleep(timeout)
            return False
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            self.drain()
        return bool(readable)

    def drain(self) -> None:
        """Discard the wake-ups received so far (the caller is about to look anyway)."""
        sock = self._listener
        if sock is None:
            return
        with suppress(BlockingIOError, InterruptedError):
            while True:
                sock.recv(16)

    def poke_self(self) -> None:
        """Wake our own ``wait`` (to stop it, or to make it look now)."""
        sock, name = self._listener, self.name
        if sock is not None and name is not None:
            # Through the listener itself: the sender belongs to the database thread.
            with suppress(OSError):  # full (it will wake anyway), or closed meanwhile
                sock.sendto(b"", f"\0{name}")

    def close(self) -> None:
        """Stop listening and withdraw our marker."""
        sock, name = self._listener, self.name
        self._listener = self.name = None
        if sock is not None:
            sock.close()
        if name is not None:
            with suppress(OSError):
                os.unlink(os.path.join(self.directory, name))
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    # ------------------------------------------------------------------ sending

    def notify(self, own: str | None) -> None:
        """Tell every other listener on the file that we committed a write (call after COMMIT)."""
        for peer in list(self._current_peers()):  # a copy: _send drops the peers that are gone
            if peer != own:
                self._send(peer)

    def _current_peers(self) -> list[str]:
        now = time.monotonic()
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return []  # nobody has ever listened on this file
        if mtime != self._peers_mtime or now - self._peers_at > PEERS_REFRESH:
            try:
                self._peers = [n for n in os.listdir(self.directory) if n.startswith(_PREFIX + self._key)]
            except OSError:
                self._peers = []
            self._peers_mtime, self._peers_at = mtime, now
        return self._peers

    def _send(self, peer: str) -> None:
        if self._sender is None:
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
        try:
            self._sender.sendto(b"", f"\0{peer}")
        except (BlockingIOError, InterruptedError):
            pass  # its queue is full: it has wake-ups waiting already
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens under that name any more (its process died without cleaning up).
            with suppress(OSError):
                os.unlink(os.path.join(self.directory, peer))
            with suppress(ValueError):
                self._peers.remove(peer)
        except OSError as exc:
            log.logger.debug("SQLite wake-up to %s failed: %s", peer, exc)
