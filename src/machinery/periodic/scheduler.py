"""The periodic scheduler: fire each registered entry once per tick across the cluster.

Every process that registered an entry runs its schedule; on each tick they all try the
cluster-wide lock of docs/wire.md §12 and only the winner sends, so a tick fires once however
many schedulers run it, Go or Python:

* key ``"machinery_lock_" + <program name> + <entry name> + <spec>``, where the program name
  is ``Config.periodic_lock_program`` or, by default, the basename of ``sys.argv[0]`` (Go
  uses the basename of its executable: set ``periodic_lock_program`` to that name, e.g.
  ``"myservice"``, for Python and Go schedulers of the same entry to share ticks);
* value: the following tick in Unix nanoseconds minus one, so the lock frees itself when
  the next tick comes.

A scheduler that falls behind (a paused process, a blocked loop) does not fire the ticks it
missed in a burst: it fires at most the latest tick, and only if that one is at most
``misfire_grace`` seconds old; the schedule then resumes at the next future tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .. import log
from ..config import Config
from ..dispatch import Dispatcher
from ..locks.base import Lock
from ..result import AsyncResult
from ..signature import Chain, Chord, Group, Signature
from ..types import unix_ns
from ..workflow.sending import send_chain, send_chord, send_group
from .schedule import Schedule, parse_spec

LOCK_PREFIX = "machinery_lock_"
"""Go's ``utils.LockKeyPrefix``."""

LOCK_RETRIES = 3
"""Attempts per tick, as Go's ``LockWithRetries`` is given."""

MAX_SLEEP = 1.0
"""The scheduler looks at its entries at least this often (new entries, clock jumps)."""


def fresh_copy(signature: Signature) -> Signature:
    """A deep copy with every UUID cleared, so that each tick sends new tasks."""
    sig = copy.deepcopy(signature)
    stack = [sig]
    while stack:
        current = stack.pop()
        current.uuid = ""
        stack.extend(current.on_success or ())
        stack.extend(current.on_error or ())
        if current.chord_callback is not None:
            stack.append(current.chord_callback)
    return sig


@dataclass(eq=False)
class PeriodicEntry:
    """One registered periodic task or workflow.

    ``kind`` is ``task``, ``chain``, ``group`` or ``chord``; ``signatures`` are the templates
    (the chord's callback is ``callback``); ``next_run`` is the next tick this process will
    try to fire (None: never).
    """

    name: str
    spec: str
    kind: str
    schedule: Schedule
    signatures: list[Signature]
    send_concurrency: int = 0
    callback: Signature | None = None
    next_run: datetime | None = None
    fired: int = field(default=0, compare=False)

    async def send(self, dispatcher: Dispatcher) -> object:
        """Send a fresh copy (new UUIDs) of the entry's task or workflow; returns its result handle."""
        sigs = [fresh_copy(s) for s in self.signatures]
        if self.kind == "task":
            await dispatcher.send(sigs[0])
            return AsyncResult(sigs[0].uuid, dispatcher.backend)
        if self.kind == "chain":
            return await send_chain(dispatcher, Chain(*sigs))
        if self.kind == "group":
            return await send_group(dispatcher, Group(*sigs), self.send_concurrency)
        assert self.callback is not None
        return await send_chord(dispatcher, Chord(Group(*sigs), fresh_copy(self.callback)), self.send_concurrency)


class Scheduler:
    """The periodic entries of one server, and the loop that fires them.

    Entries may be added and removed from any thread while the loop runs; ``run`` may run
    in several processes (and several workers of one process) at once, since the lock lets
    only one of them fire each tick.
    """

    def __init__(self, config: Config, dispatcher: Dispatcher, lock: Callable[[], Lock]) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self._lock = lock
        self.misfire_grace = 5.0
        #: Called as ``on_fire(entry, tick)`` after this process sent ``entry`` for ``tick``.
        self.on_fire: Callable[[PeriodicEntry, datetime], None] | None = None
        self._entries: dict[str, PeriodicEntry] = {}
        self._guard = threading.Lock()
        self._stops: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    # ------------------------------------------------------------------ entries

    def add(
        self,
        spec: str,
        name: str,
        kind: str,
        signatures: Iterable[Signature],
        send_concurrency: int = 0,
        callback: Signature | None = None,
    ) -> PeriodicEntry:
        """Register (or replace) the entry ``name``; raises ValueError for a bad spec."""
        if not name:
            raise ValueError("a periodic entry needs a name")
        schedule = parse_spec(spec)
        templates = [copy.deepcopy(s) for s in signatures]
        if not templates:
            raise ValueError(f"periodic {kind} {name!r} needs at least one signature")
        for sig in [*templates, *([callback] if callback is not None else [])]:
            if not isinstance(sig, Signature):
                raise TypeError(f"periodic {kind} {name!r} needs Signatures, got {sig!r}")
        if send_concurrency < 0:
            raise ValueError(f"send_concurrency must be >= 0, got {send_concurrency}")
        entry = PeriodicEntry(
            name,
            spec,
            kind,
            schedule,
            templates,
            send_concurrency,
            copy.deepcopy(callback) if callback is not None else None,
            schedule.next(self._clock()),
        )
        with self._guard:
            replaced = self._entries.get(name)
            self._entries[name] = entry
        if replaced is not None:
            log.logger.info("Periodic entry %r replaced (%s -> %s)", name, replaced.spec, spec)
        return entry

    def remove(self, name: str) -> bool:
        """Forget the entry ``name``; False if there was none."""
        with self._guard:
            return self._entries.pop(name, None) is not None

    def entries(self) -> list[PeriodicEntry]:
        """The registered entries, by name."""
        with self._guard:
            return [self._entries[n] for n in sorted(self._entries)]

    def lock_key(self, entry: PeriodicEntry) -> str:
        """The lock key of ``entry`` (docs/wire.md §12), shared with Go schedulers of the same program."""
        program = self.config.periodic_lock_program or os.path.basename(sys.argv[0])
        return LOCK_PREFIX + program + entry.name + entry.spec

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event | None = None, install_signal_handlers: bool = False) -> None:
        """Fire due entries until ``stop`` is set (or ``stop_all()``, or SIGINT/SIGTERM if asked)."""
        loop = asyncio.get_running_loop()
        # Our own event, so that stop_all() stops this loop without setting the caller's event
        # (a worker passes the event that stops the whole worker).
        halt = asyncio.Event()
        watch = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if watch is not None:
            watch.add_done_callback(lambda _: halt.set())
        mine = (loop, halt)
        with self._guard:
            self._stops.add(mine)
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, halt.set)
        sends: set[asyncio.Task[None]] = set()
        now = self._clock()
        for entry in self.entries():  # ticks that passed while nobody was running are not owed
            if entry.next_run is not None and entry.next_run <= now:
                entry.next_run = entry.schedule.next(now)
        count = len(self.entries())
        (log.logger.info if count else log.logger.debug)("Periodic scheduler started with %d entries", count)
        try:
            while not halt.is_set():
                now = self._clock()
                for coroutine in self.due(now):
                    task = asyncio.ensure_future(coroutine)
                    sends.add(task)
                    task.add_done_callback(sends.discard)
                upcoming = [e.next_run for e in self.entries() if e.next_run is not None]
                wait = MAX_SLEEP
                if upcoming:
                    wait = min(wait, max(0.0, (min(upcoming) - self._clock()).total_seconds()))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(halt.wait(), wait)
        finally:
            if watch is not None:
                watch.cancel()
            if sends:
                await asyncio.gather(*sends, return_exceptions=True)
            if install_signal_handlers:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            with self._guard:
                self._stops.discard(mine)
            log.logger.debug("Periodic scheduler stopped")

    def stop_all(self) -> None:
        """Stop every running ``run`` of this scheduler (from any thread)."""
        with self._guard:
            stops = list(self._stops)
        for loop, event in stops:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    def due(self, now: datetime) -> list[Awaitable[None]]:
        """Advance every entry past ``now``; return the firings owed (at most one per entry).

        The tick owed is the latest one not after ``now``, if it is at most
        ``misfire_grace`` seconds old; older ticks are skipped, never fired in a burst.
        """
        firings: list[Awaitable[None]] = []
        grace = timedelta(seconds=self.misfire_grace)
        for entry in self.entries():
            first = entry.next_run
            if first is None or first > now:
                continue
            schedule = entry.schedule
            entry.next_run = schedule.next(now)
            tick = schedule.next(now - grace - timedelta(microseconds=1))
            if tick is None or tick > now:
                log.logger.warning(
                    "Periodic %r skipped the ticks from %s: the scheduler was %.1f s behind; next tick at %s",
                    entry.name,
                    first.isoformat(),
                    (now - first).total_seconds(),
                    entry.next_run.isoformat() if entry.next_run else "never",
                )
                continue
            following = schedule.next(tick)
            while following is not None and following <= now:  # a few steps at most: within the grace
                tick, following = following, schedule.next(following)
            if tick > first:
                log.logger.warning(
                    "Periodic %r skipped the ticks from %s to before %s: the scheduler was behind",
                    entry.name,
                    first.isoformat(),
                    tick.isoformat(),
                )
            firings.append(self._fire(entry, tick, following))
        return firings

    async def _fire(self, entry: PeriodicEntry, tick: datetime, following: datetime | None) -> None:
        # Go stores "next tick - 1 ns": the lock is free again when the next tick comes.
        until = following if following is not None else tick + timedelta(seconds=1)
        key = self.lock_key(entry)
        try:
            if not await self._lock().lock(key, unix_ns(until) - 1, retries=LOCK_RETRIES):
                log.logger.debug("Periodic %r tick at %s is fired by another process", entry.name, tick.isoformat())
                return
        except Exception as exc:
            log.logger.error("Periodic %r: cannot take the lock %r: %s", entry.name, key, exc)
            return
        started = time.monotonic()
        try:
            await entry.send(self.dispatcher)
        except Exception as exc:
            log.logger.error("Periodic %s %r failed to send: %s", entry.kind, entry.name, exc)
            return
        entry.fired += 1
        if self.on_fire is not None:
            self.on_fire(entry, tick)
        log.logger.info(
            "Periodic %s %r sent for the tick at %s (%.3f s)",
            entry.kind,
            entry.name,
            tick.isoformat(),
            time.monotonic() - started,
        )
