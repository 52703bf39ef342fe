"""Task controls: time limits, rate limits and uniqueness, as a task declares them and a send overrides them.

A task declares its defaults when it is registered (``@server.task(time_limit=30,
soft_time_limit=25, rate_limit="100/s")``); a send may override the time limits and ask for
uniqueness (``add.send(1, 2, time_limit=5, unique_for=600)``). Per-send values travel in the
message's ``Headers`` (string values, so Go workers pass them on untouched and a Go reader sees
only Go's 19 keys): ``machinery-time-limit``, ``machinery-soft-time-limit``,
``machinery-unique-key`` and ``machinery-unique-for``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from .signature import Signature

TIME_LIMIT_HEADER = "machinery-time-limit"
SOFT_TIME_LIMIT_HEADER = "machinery-soft-time-limit"
UNIQUE_KEY_HEADER = "machinery-unique-key"
UNIQUE_FOR_HEADER = "machinery-unique-for"

#: Options a send accepts beside the Signature's own fields.
SEND_OPTIONS = frozenset({"time_limit", "soft_time_limit", "unique_for", "unique_key"})

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` runs per ``per`` seconds, across every worker of the cluster."""

    count: float
    per: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"100/s"``, ``"30/m"``, ``"2.5/h"``; ValueError naming what is wrong."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(f"rate_limit {text!r} must look like '100/s', '30/m' or '5/h' (a positive number)")
        return cls(float(match.group(1)), _PER[match.group(2)])

    @property
    def interval(self) -> float:
        """Seconds between two runs at this rate."""
        return self.per / self.count


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What a task declares for itself when it is registered."""

    time_limit: float | None = None
    soft_time_limit: float | None = None
    rate_limit: Rate | None = None

    @classmethod
    def make(
        cls, time_limit: float | None = None, soft_time_limit: float | None = None, rate_limit: str | None = None
    ) -> TaskOptions:
        _check_seconds("time_limit", time_limit)
        _check_seconds("soft_time_limit", soft_time_limit)
        return cls(time_limit, soft_time_limit, Rate.parse(rate_limit) if rate_limit is not None else None)


@dataclass(frozen=True, slots=True)
class Limits:
    """The time limits one run of a task has (None: none)."""

    soft: float | None = None
    hard: float | None = None

    def __bool__(self) -> bool:
        return self.soft is not None or self.hard is not None


def apply_send_options(signature: Signature, options: dict[str, Any]) -> Signature:
    """Put the per-send controls of ``options`` into ``signature``'s headers; returns it."""
    unknown = set(options) - SEND_OPTIONS
    if unknown:
        raise TypeError(f"unknown send options {sorted(unknown)}; the controls are {sorted(SEND_OPTIONS)}")
    headers = dict(signature.headers or {})
    for name, header in (("time_limit", TIME_LIMIT_HEADER), ("soft_time_limit", SOFT_TIME_LIMIT_HEADER)):
        if options.get(name) is not None:
            _check_seconds(name, options[name])
            headers[header] = f"{float(options[name]):g}"
    if options.get("unique_for") is not None:
        _check_seconds("unique_for", options["unique_for"])
        headers[UNIQUE_FOR_HEADER] = f"{float(options['unique_for']):g}"
        headers[UNIQUE_KEY_HEADER] = options.get("unique_key") or default_unique_key(signature)
    elif options.get("unique_key") is not None:
        raise ValueError("unique_key needs unique_for: how many seconds the task stays unique")
    signature.headers = headers
    return signature


def default_unique_key(signature: Signature) -> str:
    """Equal tasks share a key: the same name and the same arguments (types and values)."""
    return hashlib.sha1(Signature(signature.name, signature.args, _raw_args=True).encode()).hexdigest()


#: The limits of a run that has none (shared: the common case allocates nothing).
NO_LIMITS = Limits()


def limits_of(signature: Signature, options: TaskOptions, default: Limits) -> Limits:
    """The limits of this run: the send's, else the task's, else the worker's."""
    headers = signature.headers
    if not headers or (TIME_LIMIT_HEADER not in headers and SOFT_TIME_LIMIT_HEADER not in headers):
        soft = options.soft_time_limit if options.soft_time_limit is not None else default.soft
        hard = options.time_limit if options.time_limit is not None else default.hard
        return NO_LIMITS if soft is None and hard is None else Limits(soft, hard)
    return Limits(
        soft=_first(_header_seconds(headers, SOFT_TIME_LIMIT_HEADER), options.soft_time_limit, default.soft),
        hard=_first(_header_seconds(headers, TIME_LIMIT_HEADER), options.time_limit, default.hard),
    )


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def unique_claim(signature: Signature) -> tuple[str, float] | None:
    """(key, seconds) when this send asked to be unique."""
    headers = signature.headers
    if not headers or UNIQUE_KEY_HEADER not in headers:
        return None
    key, seconds = headers.get(UNIQUE_KEY_HEADER), _header_seconds(headers, UNIQUE_FOR_HEADER)
    if not key or seconds is None:
        return None
    return key, seconds


def _header_seconds(headers: dict[str, str], name: str) -> float | None:
    text = headers.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None  # a peer's garbage header does not fail the task
    return value if math.isfinite(value) and value > 0 else None


def _check_seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
