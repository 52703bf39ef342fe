"""Periodic tasks and workflows: cron specs as Go's robfig/cron reads them, fired once per tick.

Every process that registered an entry runs its schedule; on each tick they all try the
cluster-wide lock of WIRE.md 12 and only the winner sends, so a tick fires once however
many schedulers run it, Go or Python:

* key ``"machinery_lock_" + <program name> + <entry name> + <spec>``, where the program name
  is ``Config.periodic_lock_program`` or, by default, the basename of ``sys.argv[0]`` (Go
  uses the basename of its executable: set ``periodic_lock_program`` to that name, e.g.
  ``"myservice"``, for Python and Go schedulers of the same entry to share ticks);
* value: the following tick in Unix nanoseconds minus one, so the lock frees itself when
  the next tick comes.

Specs follow ``cron.ParseStandard``: five fields (minute hour day-of-month month
day-of-week, ``?`` allowed for ``*``, month and weekday names), the descriptors
``@yearly @annually @monthly @weekly @daily @midnight @hourly``, ``@every <Go duration>``
(e.g. ``@every 1h30m``, whole seconds, at least one), and an optional ``CRON_TZ=<zone>`` or
``TZ=<zone>`` prefix; cron fields run in local time otherwise, as Go's scheduler does.
One deliberate difference: ``@every`` ticks fall on multiples of the interval since the
Unix epoch instead of counting from each process's start, so that every process agrees on
when a tick is (with ``@every 1s`` the two are the same).

A scheduler that falls behind (a paused process, a blocked loop) does not fire the ticks it
missed in a burst: it fires at most the latest tick, and only if that one is at most
``misfire_grace`` seconds old; the schedule then resumes at the next future tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
import sys
import threading
import time
import zoneinfo
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Protocol

from croniter import CroniterBadDateError, croniter

from . import log
from .signature import Chain, Chord, Group, Signature
from .types import unix_ns

if TYPE_CHECKING:
    from .server import Server

LOCK_PREFIX = "machinery_lock_"
"""Go's ``utils.LockKeyPrefix``."""

LOCK_RETRIES = 3
"""Attempts per tick, as Go's ``LockWithRetries`` is given."""

MAX_SLEEP = 1.0
"""The scheduler looks at its entries at least this often (new entries, clock jumps)."""

_NS = 1_000_000_000


# --------------------------------------------------------------------------- schedules


class Schedule(Protocol):
    """When an entry fires."""

    def next(self, after: datetime) -> datetime | None:
        """The first tick strictly after ``after`` (aware), or None if there is none."""


@dataclass(frozen=True)
class EverySchedule:
    """``@every <duration>``: every ``seconds`` seconds, on multiples of it since the epoch."""

    seconds: int

    def next(self, after: datetime) -> datetime | None:
        step = self.seconds * _NS
        tick = (unix_ns(after) // step + 1) * step
        return datetime.fromtimestamp(tick // _NS, timezone.utc)


@dataclass(frozen=True)
class CronSchedule:
    """Five cron fields (normalised for croniter) evaluated in ``zone``."""

    expression: str
    zone: tzinfo

    def next(self, after: datetime) -> datetime | None:
        try:
            tick: datetime = croniter(self.expression, after.astimezone(self.zone)).get_next(datetime)
        except CroniterBadDateError:  # e.g. "0 0 30 2 *": robfig never fires it either
            return None
        return tick


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

# robfig/cron's field bounds and names (parser.go).
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}),
)

_DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def parse_spec(spec: str) -> Schedule:
    """Parse a spec as robfig/cron's ``ParseStandard``; raises ValueError with the reason."""
    if not isinstance(spec, str):
        raise ValueError(f"a cron spec must be a string, got {spec!r}")
    text = spec.strip()
    if not text:
        raise ValueError("empty spec string")
    zone: tzinfo | None = None
    if text.startswith(("TZ=", "CRON_TZ=")):
        head, _, rest = text.partition(" ")
        zone = _zone(head.split("=", 1)[1])
        text = rest.strip()
        if not text:
            raise ValueError(f"{spec!r} has a time zone but no schedule")
    if text.startswith("@every "):
        seconds = parse_go_duration(text[len("@every ") :].strip()) // _NS
        return EverySchedule(max(1, seconds))  # robfig: whole seconds, at least one
    if text.startswith("@"):
        if text not in _DESCRIPTORS:
            raise ValueError(f"unrecognized descriptor: {text}")
        text = _DESCRIPTORS[text]
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"expected exactly 5 fields, found {len(fields)}: {fields}")
    normalised = " ".join(_field(value, *bounds) for value, bounds in zip(fields, _FIELDS, strict=True))
    return CronSchedule(normalised, zone if zone is not None else local_zone())


def _field(text: str, what: str, low: int, high: int, names: dict[str, int]) -> str:
    """Validate one field as robfig's ``getField`` and write it out for croniter.

    A field containing a bare ``*``/``?`` stays ``*`` (it matters for the day-of-month /
    day-of-week rule: both restricted means either may match); anything else becomes the
    explicit list of values, so both libraries read the same set.
    """
    values: set[int] = set()
    star = False
    for part in text.split(","):
        range_and_step = part.split("/")
        low_high = range_and_step[0].split("-")
        if len(range_and_step) > 2:
            raise ValueError(f"too many slashes: {part} (in the {what} field)")
        if low_high[0] in ("*", "?"):
            start, end, part_star = low, high, True
        else:
            if len(low_high) > 2:
                raise ValueError(f"too many hyphens: {part} (in the {what} field)")
            start = _number(low_high[0], names, what)
            end = _number(low_high[1], names, what) if len(low_high) == 2 else start
            part_star = False
        step = 1
        if len(range_and_step) == 2:
            step = _number(range_and_step[1], {}, what)
            if len(low_high) == 1:
                end = high  # "N/step" means "N-max/step"
            if step > 1:
                part_star = False
        if start < low:
            raise ValueError(f"beginning of range ({start}) below minimum ({low}): {part} (in the {what} field)")
        if end > high:
            raise ValueError(f"end of range ({end}) above maximum ({high}): {part} (in the {what} field)")
        if start > end:
            raise ValueError(f"beginning of range ({start}) beyond end of range ({end}): {part} (in the {what} field)")
        if step == 0:
            raise ValueError(f"step of range should be a positive number: {part} (in the {what} field)")
        values.update(range(start, end + 1, step))
        star = star or part_star
    return "*" if star else ",".join(str(v) for v in sorted(values))


def _number(text: str, names: dict[str, int], what: str) -> int:
    named = names.get(text.lower())
    if named is not None:
        return named
    if not text.isdigit():
        if text.startswith("-") and text[1:].isdigit():
            raise ValueError(f"negative number ({text}) not allowed (in the {what} field)")
        raise ValueError(f"failed to parse int from {text!r} (in the {what} field)")
    return int(text)


def _zone(name: str) -> tzinfo:
    if name in ("", "UTC"):
        return timezone.utc
    if name == "Local":
        return local_zone()
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"provided bad location {name}: {exc}") from None


def local_zone() -> tzinfo:
    """The machine's time zone with its DST rules where they can be found (Go's time.Local)."""
    name = os.environ.get("TZ", "").lstrip(":")
    try:
        if name:
            return zoneinfo.ZoneInfo(name)
        with open("/etc/localtime", "rb") as rules:
            return zoneinfo.ZoneInfo.from_file(rules)
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return datetime.now().astimezone().tzinfo or timezone.utc


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": _NS,
    "m": 60 * _NS,
    "h": 3600 * _NS,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")


def parse_go_duration(text: str) -> int:
    """Parse a Go ``time.ParseDuration`` string (``1h30m``, ``10s``, ``1.5h``, ``300ms``) to ns."""
    rest = text
    sign = 1
    if rest[:1] in ("+", "-"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total = Decimal(0)
    while rest:
        match = _DURATION_PART.match(rest)
        assert match is not None  # the pattern matches the empty string
        number, unit = match.groups()
        if number in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        if not unit:
            raise ValueError(f'time: missing unit in duration "{text}"')
        known = next((u for u in sorted(_DURATION_UNITS, key=len, reverse=True) if unit.startswith(u)), None)
        if known is None:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{text}"')
        try:
            total += Decimal(number) * _DURATION_UNITS[known]
        except InvalidOperation:
            raise ValueError(f'time: invalid duration "{text}"') from None
        rest = rest[match.start(2) + len(known) :]
    return sign * int(total)


# --------------------------------------------------------------------------- entries


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

    async def send(self, server: Server) -> object:
        """Send a fresh copy (new UUIDs) of the entry's task or workflow; returns its result handle."""
        sigs = [fresh_copy(s) for s in self.signatures]
        if self.kind == "task":
            return await server.asend_task(sigs[0])
        if self.kind == "chain":
            return await server.asend_chain(Chain(*sigs))
        if self.kind == "group":
            return await server.asend_group(Group(*sigs), self.send_concurrency)
        assert self.callback is not None
        return await server.asend_chord(Chord(Group(*sigs), fresh_copy(self.callback)), self.send_concurrency)


class Scheduler:
    """The periodic entries of one server, and the loop that fires them.

    Entries may be added and removed from any thread while the loop runs; ``run`` may run
    in several processes (and several workers of one process) at once, since the lock lets
    only one of them fire each tick.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
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
        """The lock key of ``entry`` (WIRE.md 12), shared with Go schedulers of the same program."""
        program = self.server.config.periodic_lock_program or os.path.basename(sys.argv[0])
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
            if not await self.server.lock.lock(key, unix_ns(until) - 1, retries=LOCK_RETRIES):
                log.logger.debug("Periodic %r tick at %s is fired by another process", entry.name, tick.isoformat())
                return
        except Exception as exc:
            log.logger.error("Periodic %r: cannot take the lock %r: %s", entry.name, key, exc)
            return
        started = time.monotonic()
        try:
            await entry.send(self.server)
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
