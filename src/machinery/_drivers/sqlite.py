"""The embedded SQLite store shared by the SQLite broker, result backend and lock.

One ``SQLiteStore`` exists per process and database file. It owns a single
``sqlite3.Connection`` on a dedicated thread (connections cannot move between threads, and
sqlite3 calls must never block an event loop), so the broker, backend and lock of a process
queue their statements on that one thread, whatever event loop they are called from.

Several processes share one file through WAL mode: readers never block, writers wait for
each other (``busy_timeout``, then a short retry with backoff for the ``SQLITE_BUSY`` cases
SQLite does not wait on by itself).

Waiting without a busy loop: a waiter in this process is woken directly by a write made in
this process; writes from other processes are noticed by a watcher thread that checks
``PRAGMA data_version`` on its own connection, only while someone is waiting. On Linux the
writing process wakes that thread at once through a datagram socket (``sqlite_wake``), and
the watcher polls only every ``WATCH_INTERVAL_NOTIFIED`` seconds as a safety net; elsewhere
it polls every few milliseconds.

URLs follow SQLAlchemy: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
``sqlite://`` or ``sqlite:///:memory:`` for a private in-process database. The query option
``?synchronous=normal`` trades durability on power loss for speed (default ``full``: a
committed publish survives power loss).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import log
from .._loops import Waiters
from ..errors import BrokerConnectionError, ConfigError
from ..state import COMPLETED_STATES
from . import sqlite_wake

P = ParamSpec("P")
T = TypeVar("T")

MEMORY = ":memory:"

#: Milliseconds SQLite itself waits for another connection's lock before reporting busy.
BUSY_TIMEOUT_MS = 5000
#: Seconds we keep retrying after SQLite reported busy anyway (WAL snapshot races, recovery).
BUSY_RETRY_SECONDS = 15.0
#: Seconds between ``PRAGMA data_version`` checks while someone waits and the database is
#: busy. A check costs ~4 µs, but each wake-up of a thread costs ~30 µs of CPU, so...
WATCH_INTERVAL = 0.002
#: ...after ``WATCH_QUIET_AFTER`` seconds without a change the watcher checks less often:
#: an idle worker then costs under 1 % of a core, and the first message after a quiet
#: spell is still seen within a few milliseconds.
WATCH_INTERVAL_QUIET = 0.005
WATCH_QUIET_AFTER = 1.0
#: Seconds between checks while writers wake the watcher through the wake-up channel: only
#: a writer that cannot (another program, or one that has not seen our listener yet) waits
#: this long to be noticed.
WATCH_INTERVAL_NOTIFIED = 0.05

SCHEMA_VERSION = 2
#: What takes a store of each older version to the next one (version 0 is a new file).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX IF EXISTS messages_ready",
    ),
}
_SYNCHRONOUS = ("off", "normal", "full", "extra")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY,
    queue         TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    avail_at      INTEGER NOT NULL,           -- Unix ns from when the message may be taken
    priority      INTEGER NOT NULL DEFAULT 0, -- 0-9, higher taken first
    lease_owner   TEXT,                       -- consumer that took it (kept after expiry)
    lease_expires INTEGER NOT NULL DEFAULT 0  -- Unix ns, free again once this has passed
);
CREATE INDEX IF NOT EXISTS messages_next ON messages (queue, priority DESC, avail_at);
CREATE INDEX IF NOT EXISTS messages_owner ON messages (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters (
    id      INTEGER PRIMARY KEY,
    queue   TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    time_ns INTEGER NOT NULL,
    body    BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue);
-- seq grows with every write (AUTOINCREMENT never reuses a value), so the watcher finds
-- the states written since its last look with one range scan.
CREATE TABLE IF NOT EXISTS task_states (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid       TEXT    NOT NULL UNIQUE,
    state      TEXT    NOT NULL,
    body       TEXT    NOT NULL,              -- TaskState JSON, as the Redis backend stores it
    expires_at INTEGER NOT NULL               -- Unix ns
);
CREATE INDEX IF NOT EXISTS task_states_expiry ON task_states (expires_at);
CREATE TABLE IF NOT EXISTS group_metas (
    uuid       TEXT    PRIMARY KEY,
    body       TEXT    NOT NULL,              -- GroupMeta JSON
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS group_metas_expiry ON group_metas (expires_at);
CREATE TABLE IF NOT EXISTS locks (
    key      TEXT    PRIMARY KEY,
    deadline INTEGER NOT NULL                 -- Unix ns, as Go's lock value
);
CREATE TABLE IF NOT EXISTS claims (
    key        TEXT    PRIMARY KEY,           -- a unique task's key
    value      TEXT    NOT NULL,              -- the UUID that holds it
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_limits (
    key     TEXT PRIMARY KEY,                 -- a task name
    arrival REAL NOT NULL                     -- Unix s: when the next run is due (GCRA)
);
CREATE TABLE IF NOT EXISTS annotations (
    uuid       TEXT    NOT NULL,              -- task UUID
    name       TEXT    NOT NULL,              -- traceback, progress
    value      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (uuid, name)
);
CREATE TABLE IF NOT EXISTS revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- grows with every revocation: the version
    uuid       TEXT    NOT NULL UNIQUE,
    terminate  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    tag        TEXT    PRIMARY KEY,
    body       TEXT    NOT NULL,              -- WorkerInfo JSON
    expires_at INTEGER NOT NULL               -- Unix ns: alive until then
);
"""


# ---------------------------------------------------------------------------------- URLs


def parse_sqlite_url(url: str) -> tuple[str, str]:
    """Return (absolute path or ``:memory:``, synchronous mode) for a ``sqlite://`` URL.

    A relative path is resolved against the current working directory now, so a later
    ``chdir`` does not move the database.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigError(f"{url!r} is not a sqlite:// URL")
    if parts.netloc:
        raise ConfigError(
            f"SQLite URL {url!r} names a host; use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    synchronous = "full"
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() == "synchronous" and value.lower() in _SYNCHRONOUS:
            synchronous = value.lower()
        else:
            raise ConfigError(
                f"SQLite URL {url!r}: unknown option {key}={value!r}; supported: synchronous={'|'.join(_SYNCHRONOUS)}"
            )
    path = unquote(parts.path)
    # "sqlite:///x.db" has path "/x.db" (relative x.db); "sqlite:////x.db" has "//x.db" (absolute).
    path = path[1:] if path.startswith("/") else path
    if path in ("", MEMORY):
        return MEMORY, synchronous
    return os.path.abspath(path), synchronous


def is_busy(exc: sqlite3.Error) -> bool:
    """True for SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock; try again."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in (5, 6)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken up front (``BEGIN IMMEDIATE``), so that a read inside it can
    never be invalidated by another writer: read-modify-write is atomic across processes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ---------------------------------------------------------------------------------- store


class SQLiteStore:
    """One database file in one process: its connection thread, its waiters and its watcher."""

    def __init__(self, path: str, synchronous: str = "full") -> None:
        self.path = path
        self.synchronous = synchronous
        self.pid = os.getpid()
        self.closed = False
        self.waiters = waiters_for(path)
        self._refs = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="machinery-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._result_refs: dict[str, int] = {}
        self._result_seq: int | None = None  # last task_states.seq the watcher has looked at
        self._watcher: threading.Thread | None = None
        self._watcher_idle = False
        self._channel = sqlite_wake.WakeChannel(path) if path != MEMORY and sqlite_wake.supported() else None

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"

    # ------------------------------------------------------------------ running statements

    def submit(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(connection, *args)`` on the database thread."""
        if self.closed:
            raise BrokerConnectionError(f"SQLite store {self.path} is closed")

        def job(conn: sqlite3.Connection) -> T:
            return fn(conn, *args, **kwargs)

        try:
            return self._executor.submit(self._call, job)
        except RuntimeError:
            # Closed by another thread since the check above, or the interpreter is exiting
            # (daemon threads still run): nothing can run here any more.
            self.closed = True
            raise BrokerConnectionError(f"SQLite store {self.path} is closed") from None

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(connection, *args)`` on the database thread and return its result.

        ``fn`` must be all-or-nothing (one statement, or one ``transaction``): it is run
        again from the start when SQLite reports the database busy.
        """
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def unflushed(
        self,
        conn: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(conn, ...)`` with its commit not flushed to disk on its own (``synchronous=NORMAL``
        for it): the next flushed commit, or the next checkpoint, takes it to disk (WAL frames
        are written in order). Pass it to ``submit`` only for writes whose loss on a power
        failure repeats work without losing any: a lease, an acknowledgement, a STARTED, which
        at-least-once allows to be redone. Atomicity and what other connections see are unchanged."""
        if self.synchronous not in ("full", "extra") or self.path == MEMORY:
            return fn(conn, *args, **kwargs)
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            return fn(conn, *args, **kwargs)
        finally:
            if conn.in_transaction:  # the level may not change inside one; _call rolls back anyway
                conn.execute("ROLLBACK")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")

    async def ensure_open(self) -> None:
        """Open the database (creating file, directories and schema) if not done yet."""
        if self._conn is None:  # read from another thread: at worst one needless round trip
            await self.run(_noop)

    def _call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        delay = 0.001
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            try:
                conn = self._connection()
                before = conn.total_changes
                result = job(conn)
                if self._channel is not None and conn.total_changes != before:
                    # Committed a write: wake the watchers of the other processes now.
                    self._channel.notify(self._channel.name)
                return result
            except sqlite3.OperationalError as exc:
                self._rollback()
                if is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
                    continue
                if not is_busy(exc):
                    self._drop_connection()  # disk or file trouble: reopen on the next call
                raise BrokerConnectionError(f"SQLite database {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.path != MEMORY:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.logger.warning("SQLite %s: cannot use WAL mode (got %s); concurrency suffers", self.path, mode)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            with transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise BrokerConnectionError(
                        f"SQLite database {self.path} has schema version {version}, newer than this "
                        f"machinery's {SCHEMA_VERSION}; upgrade machinery or use another file"
                    )
                for older in range(version, SCHEMA_VERSION) if version else ():
                    for statement in _MIGRATIONS[older]:
                        conn.execute(statement)
                for statement in _SCHEMA.split(";"):  # (no ";" inside the schema's comments)
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        log.logger.debug("SQLite store %s opened (synchronous=%s)", self.path, self.synchronous)
        return conn

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    # ------------------------------------------------------------------ waking waiters

    def queue_waiter(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[None], Callable[[], None]]:
        """A future resolved on the next change to the database (any table, any process).

        Returns the future and a function that unregisters it; register before looking at
        the queue, so that a change between the look and the wait is not missed.
        """
        entry = (loop, loop.create_future())
        with self._lock:
            self._queue_waiters.add(entry)
            self._activate()

        def remove() -> None:
            with self._lock:
                self._queue_waiters.discard(entry)

        return entry[1], remove

    def wake_queues(self) -> None:
        """Wake every consumer of this process waiting for messages (after a local write)."""
        with self._lock:
            targets = list(self._queue_waiters)
        _wake(targets)

    async def watch_result(self, task_uuid: str) -> None:
        """Have completions of ``task_uuid`` written by any process notify ``self.waiters``."""
        await self.ensure_open()  # the watcher reads task_states, so the schema must exist
        with self._lock:
            self._result_refs[task_uuid] = self._result_refs.get(task_uuid, 0) + 1
            self._activate()

    def unwatch_result(self, task_uuid: str) -> None:
        """Undo one ``watch_result``."""
        with self._lock:
            count = self._result_refs.get(task_uuid, 0) - 1
            if count > 0:
                self._result_refs[task_uuid] = count
            else:
                self._result_refs.pop(task_uuid, None)
                if not self._result_refs:
                    self._result_seq = None  # nobody left to wake: the next watcher starts afresh

    def _activate(self) -> None:
        """Start or wake the watcher; call with ``_lock`` held."""
        if self.path == MEMORY or self.closed:
            return  # a private database has no other writers to watch for
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="machinery-sqlite-watch", daemon=True)
            self._watcher.start()
        elif self._watcher_idle:
            self._wake.notify()

    def _watch(self) -> None:
        """Watcher thread: while anyone waits, look for commits by other connections."""
        conn: sqlite3.Connection | None = None
        version: int | None = None
        last_change = time.monotonic()
        channel = self._channel
        notified = channel is not None and channel.listen()
        while True:
            with self._lock:
                while not self.closed and not self._queue_waiters and not self._result_refs:
                    # Nobody waits: forget where the result scan was, as nobody would be
                    # woken by what happens meanwhile. ``version`` is kept: a commit made
                    # while idle still shows as a change on the next check.
                    self._result_seq = None
                    self._watcher_idle = True
                    self._wake.wait()
                    self._watcher_idle = False
                if self.closed:
                    break
            if notified:
                assert channel is not None
                channel.drain()  # what arrived until now is seen by the look below
            try:
                if conn is None:
                    conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                    conn.execute("PRAGMA query_only = 1")
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                # The first look has nothing to compare with: wake everyone once to re-check.
                if current != version:
                    version = current
                    last_change = time.monotonic()
                    self._changed(conn)
            except Exception as exc:  # keep watching; waiters also re-check on their own timeouts
                log.logger.warning("SQLite %s: watching for changes failed: %s", self.path, exc)
                if conn is not None:
                    conn.close()
                conn, version = None, None
                time.sleep(0.5)
            if notified:
                assert channel is not None
                channel.wait(WATCH_INTERVAL_NOTIFIED)  # close() pokes it too
                continue
            with self._lock:
                if not self.closed:
                    quiet = time.monotonic() - last_change > WATCH_QUIET_AFTER
                    self._watcher_idle = True  # so that _activate() and close() notify us
                    self._wake.wait(WATCH_INTERVAL_QUIET if quiet else WATCH_INTERVAL)
                    self._watcher_idle = False
        if channel is not None:
            channel.close()
        if conn is not None:
            conn.close()

    def _changed(self, conn: sqlite3.Connection) -> None:
        """Another connection committed: wake the queue waiters and the completed results."""
        with self._lock:
            queue_targets = list(self._queue_waiters)
            watching = bool(self._result_refs)
            since = self._result_seq
        _wake(queue_targets)
        if not watching:
            return
        done: list[tuple[str, bytes | None]]
        if since is None:
            latest = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM task_states").fetchone()[0]
            with self._lock:
                self._result_seq = latest
                # A fresh start: every waiter re-reads its state once.
                done = [(task_uuid, None) for task_uuid in self._result_refs]
        else:
            rows = conn.execute("SELECT seq, uuid, state, body FROM task_states WHERE seq > ?", (since,)).fetchall()
            if not rows:
                return
            with self._lock:
                self._result_seq = max(row[0] for row in rows)
                # The waiters get the stored state itself and need not read it again.
                done = [
                    (uuid, str(body).encode())
                    for _, uuid, state, body in rows
                    if state in COMPLETED_STATES and uuid in self._result_refs
                ]
        for task_uuid, state in done:
            self.waiters.notify(task_uuid, state)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the watcher, close the connection and the database thread."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._wake.notify_all()
            targets = list(self._queue_waiters)
        if self._channel is not None:
            self._channel.poke_self()  # the watcher may be waiting on its socket
        _wake(targets)
        self._executor.submit(self._drop_connection)
        self._executor.shutdown(wait=False)


def _noop(conn: sqlite3.Connection) -> None:
    return None


def _wake(targets: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, future in targets:
        with suppress(RuntimeError):  # that loop has closed
            loop.call_soon_threadsafe(_resolve, future)


# ---------------------------------------------------------------------------------- registry

_registry: dict[str, SQLiteStore] = {}
_waiters: dict[str, Waiters] = {}
_registry_lock = threading.RLock()  # re-entered: SQLiteStore() calls waiters_for()


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held the lock when it forked; it would never be
    # released in the child.
    global _registry_lock
    _registry_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def waiters_for(path: str) -> Waiters:
    """The one ``Waiters`` of a database file in this process, shared by every backend on it."""
    with _registry_lock:
        waiters = _waiters.get(path)
        if waiters is None:
            waiters = _waiters[path] = Waiters()
        return waiters


def acquire_store(path: str, synchronous: str = "full") -> SQLiteStore:
    """The store of ``path`` in this process, creating it if needed; pair with ``release_store``."""
    with _registry_lock:
        store = _registry.get(path)
        # A store inherited through fork() is not used: its threads do not exist here and
        # its connection must not be touched by this process. Start afresh (without closing
        # the parent's). The path's Waiters are kept, as backends made before the fork hold them.
        if store is None or store.closed or store.pid != os.getpid():
            store = _registry[path] = SQLiteStore(path, synchronous)
        elif store.synchronous != synchronous:
            log.logger.debug("SQLite %s is already open with synchronous=%s", path, store.synchronous)
        store._refs += 1
        return store


def release_store(store: SQLiteStore) -> None:
    """Drop one reference; the last one closes the store."""
    with _registry_lock:
        store._refs -= 1
        if store._refs > 0:
            return
        if _registry.get(store.path) is store:
            del _registry[store.path]
    store.close()


class StoreHandle:
    """A component's claim on the store of its URL, taken on first use and given up by ``release``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self.synchronous = parse_sqlite_url(url)
        self._store: SQLiteStore | None = None
        self._guard = threading.Lock()

    @property
    def store(self) -> SQLiteStore:
        """The live store, acquired now if this component has none (or only a pre-fork one)."""
        with self._guard:
            store = self._store
            if store is None or store.closed or store.pid != os.getpid():
                store = self._store = acquire_store(self.path, self.synchronous)
            return store

    def release(self) -> None:
        """Give the store back (closing it if nobody else in this process uses it)."""
        with self._guard:
            store, self._store = self._store, None
        if store is not None and store.pid == os.getpid() and not store.closed:
            release_store(store)


def now_ns() -> int:
    """Wall-clock Unix nanoseconds: shared by every process on the machine, unlike monotonic time."""
    return time.time_ns()


def ns_after(seconds: float) -> int:
    """Unix nanoseconds ``seconds`` from now."""
    return time.time_ns() + int(seconds * 1_000_000_000)
