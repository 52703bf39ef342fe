"""Cron specs as Go's robfig/cron ``ParseStandard`` reads them, and Go's duration strings.

Specs: five fields (minute hour day-of-month month day-of-week, ``?`` allowed for ``*``,
month and weekday names), the descriptors ``@yearly @annually @monthly @weekly @daily
@midnight @hourly``, ``@every <Go duration>`` (e.g. ``@every 1h30m``, whole seconds, at least
one), and an optional ``CRON_TZ=<zone>`` or ``TZ=<zone>`` prefix; cron fields run in local
time otherwise, as Go's scheduler does. One deliberate difference: ``@every`` ticks fall on
multiples of the interval since the Unix epoch instead of counting from each process's
start, so that every process agrees on when a tick is (with ``@every 1s`` the two are the same).
"""

from __future__ import annotations

import os
import re
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Protocol

from ..types import unix_ns

_NS = 1_000_000_000


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
        from croniter import CroniterBadDateError, croniter  # loaded by processes with a cron schedule only

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
