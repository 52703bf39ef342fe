"""Go type names and Python values: arguments, results and times as Go Machinery writes them.

Conversion follows docs/wire.md §3 (what a Go worker accepts) and §4 (what a Go
reader can reflect back), so that every value we write is one a Go peer can read.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import ArgumentError, ResultTypeError

INT_RANGES: dict[str, tuple[int, int]] = {
    "int": (-(2**63), 2**63 - 1),
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint": (0, 2**64 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
FLOAT_TYPES = frozenset({"float32", "float64"})
SCALAR_TYPES = frozenset({"bool", "string", *INT_RANGES, *FLOAT_TYPES})
BYTE_SLICE_TYPES = frozenset({"[]byte", "[]uint8"})
SLICE_TYPES = frozenset({f"[]{t}" for t in SCALAR_TYPES} | BYTE_SLICE_TYPES)
GO_TYPES = SCALAR_TYPES | SLICE_TYPES

_INT64 = INT_RANGES["int64"]
_UINT64 = INT_RANGES["uint64"]


@dataclass(slots=True)
class Arg:
    """One positional task argument with its Go type name (``int64``, ``[]string``, ...).

    ``value`` is the Python value (``bytes`` for ``[]byte``). ``name`` is informational only.
    """

    type: str
    value: Any
    name: str = ""

    def __post_init__(self) -> None:
        if self.type not in GO_TYPES:
            raise ValueError(f"{self.type!r} is not one of the supported Go types: {sorted(GO_TYPES)}")

    @classmethod
    def from_wire(cls, go_type: str, value: Any, name: str = "") -> Arg:
        """An Arg as a message carries it: the JSON value as decoded, the type not checked here.

        An unknown type then fails the task at argument conversion with Go's error
        (``decimal is not one of supported types``) instead of making the message undecodable.
        """
        arg = object.__new__(cls)
        arg.type, arg.value, arg.name = go_type, value, name
        return arg


# --------------------------------------------------------------------------- sending side


def infer_arg(value: Any, where: str) -> Arg:
    """Type a plain Python value as Go would see it; ``where`` names it in errors."""
    if isinstance(value, Arg):
        check_value(value.type, value.value, where)
        return value
    go_type = infer_type(value, where)
    check_value(go_type, value, where)
    return Arg(go_type, value)


def infer_type(value: Any, where: str) -> str:
    """Return the Go type name for ``value`` or raise ``ValueError`` naming ``where``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray)):
        return "[]byte"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(
                f"{where}: cannot tell the Go element type of an empty list; "
                "pass Arg('[]int64', []) or another slice type explicitly"
            )
        kinds = {infer_type(v, where) for v in value}
        if kinds == {"int64", "float64"}:
            return "[]float64"
        if len(kinds) != 1 or next(iter(kinds)) not in SCALAR_TYPES:
            raise ValueError(f"{where}: a list must hold values of one scalar type, got {sorted(kinds)}")
        return "[]" + next(iter(kinds))
    raise ValueError(
        f"{where}: {type(value).__name__} value {value!r} has no Go type; "
        "use bool, int, float, str, bytes or a list of one of those"
    )


def check_value(go_type: str, value: Any, where: str) -> None:
    """Refuse a value a Go worker could not decode as ``go_type`` (docs/wire.md §9.5: it would wedge)."""
    if go_type in SLICE_TYPES:
        if go_type in BYTE_SLICE_TYPES and isinstance(value, (bytes, bytearray)):
            return
        if value is None:
            return
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {go_type} needs a list, got {value!r}")
        for i, item in enumerate(value):
            check_value(go_type[2:] if go_type not in BYTE_SLICE_TYPES else "uint8", item, f"{where}[{i}]")
        return
    if go_type == "bool":
        ok = isinstance(value, bool)
    elif go_type == "string":
        ok = isinstance(value, str)
    elif go_type in FLOAT_TYPES:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        low, high = INT_RANGES[go_type]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        if not ok and isinstance(value, int) and not isinstance(value, bool) and go_type == "int64":
            raise ValueError(
                f"{where}: {value} does not fit in int64; pass Arg('uint64', value) for values up to 2**64-1"
            )
    if not ok:
        raise ValueError(f"{where}: {value!r} is not a valid {go_type}")


def wire_value(go_type: str, value: Any) -> Any:
    """The JSON value Go writes for ``value`` of ``go_type`` (bytes as base64, integral floats bare)."""
    if go_type in BYTE_SLICE_TYPES and isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if go_type in FLOAT_TYPES:
        return _go_float(value)
    if go_type in SLICE_TYPES and isinstance(value, str):
        return value  # a decoded message's []byte / []uint* value: already base64 text (docs/wire.md §3.2)
    if go_type in SLICE_TYPES and value is not None:
        element = go_type[2:]
        if element in FLOAT_TYPES:
            return [_go_float(v) for v in value]
        return list(value)
    return value


def _go_float(value: float) -> float | int:
    # Go prints integral floats without a fraction ("3", not "3.0") below 1e21.
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


# --------------------------------------------------------------------------- receiving side


def convert_value(go_type: str, raw: Any) -> Any:
    """Turn a decoded JSON value into the Python value of ``go_type`` (docs/wire.md §3.2).

    Raises ``ArgumentError`` with Go's wording where Go has one.
    """
    converter = _CONVERTERS.get(go_type)
    if converter is None:
        raise ArgumentError(f"{go_type} is not one of supported types")
    return converter(raw)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise ArgumentError(f"{raw!r} is not bool")


def _to_string(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise ArgumentError(f"{raw!r} is not string")


def _int_converter(go_type: str) -> Callable[[Any], int]:
    low, high = INT_RANGES[go_type]

    def convert(raw: Any) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            if low <= raw <= high:
                return raw
            raise ArgumentError(f"{raw} is out of range for {go_type}")
        if isinstance(raw, float):
            raise ArgumentError(f'parsing "{raw!r}": {go_type} needs an integer')
        raise ArgumentError(f"{raw!r} is not {go_type}")

    return convert


def _to_float(raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    raise ArgumentError(f"{raw!r} is not a number")


def _slice_converter(go_type: str) -> Callable[[Any], Any]:
    element = go_type[2:]
    convert_element = _CONVERTERS[element if go_type not in BYTE_SLICE_TYPES else "uint8"]
    byteish = go_type in BYTE_SLICE_TYPES or element.startswith("uint")

    def convert(raw: Any) -> Any:
        if raw is None:
            return b"" if go_type in BYTE_SLICE_TYPES else []
        if byteish and isinstance(raw, str):
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ArgumentError(f"{raw!r} is not valid base64 for {go_type}") from exc
            return data if go_type in BYTE_SLICE_TYPES else list(data)
        if not isinstance(raw, list):
            raise ArgumentError(f"{raw!r} is not {go_type}")
        values = [convert_element(v) for v in raw]
        return bytes(values) if go_type in BYTE_SLICE_TYPES else values

    return convert


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "bool": _to_bool,
    "string": _to_string,
    "float32": _to_float,
    "float64": _to_float,
    **{t: _int_converter(t) for t in INT_RANGES},
}
_CONVERTERS.update({t: _slice_converter(t) for t in SLICE_TYPES})


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class TaskResult:
    """One returned value as stored by the backend: ``{"Type": ..., "Value": ...}``."""

    type: str
    value: Any

    def to_wire(self) -> dict[str, Any]:
        return {"Type": self.type, "Value": self.value}


def encode_results(returned: Any) -> list[TaskResult]:
    """Turn a task's return value into Go TaskResults; a tuple is several results, None is none."""
    if returned is None:
        return []
    values: Sequence[Any] = returned if isinstance(returned, tuple) else (returned,)
    results = []
    for i, value in enumerate(values):
        if isinstance(value, Arg):
            go_type, plain = value.type, value.value
            try:
                check_value(go_type, plain, f"result {i}")
            except ValueError as exc:
                raise ResultTypeError(f"the task's {exc}") from None
        else:
            try:
                go_type = infer_type(value, f"result {i}")
                if go_type == "int64" and isinstance(value, int) and value > _INT64[1]:
                    go_type = "uint64"
                check_value(go_type, value, f"result {i}")
            except ValueError as exc:
                raise ResultTypeError(f"the task's {exc}") from None
            plain = value
        if go_type in BYTE_SLICE_TYPES:
            go_type = "[]uint8"  # reflect.TypeOf([]byte{}).String() is "[]uint8"
        results.append(TaskResult(go_type, wire_value(go_type, plain)))
    return results


def decode_results(results: Sequence[TaskResult] | None) -> Any:
    """The Python value of stored results: None, one value, or a tuple of several."""
    if not results:
        return None
    values = tuple(convert_value(r.type, r.value) for r in results)
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- times

ZERO_TIME = "0001-01-01T00:00:00Z"


def format_time(moment: datetime | None) -> str:
    """RFC 3339 in UTC with trailing fraction zeros trimmed, as Go writes ``time.Time``."""
    if moment is None:
        return ZERO_TIME
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment!r} is naive; Go needs a time with a zone (use datetime.now(timezone.utc))")
    utc = moment.astimezone(timezone.utc)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str) -> datetime | None:
    """Parse an RFC 3339 timestamp with a zone; the zero time is None. Raises ValueError."""
    if text == ZERO_TIME:
        return None
    if not isinstance(text, str) or len(text) < 19 or text[10] not in "Tt":
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    head, zone = text[:19], text[19:]
    fraction = ""
    if zone.startswith("."):
        end = 1
        while end < len(zone) and zone[end].isdigit():
            end += 1
        fraction, zone = zone[1:end], zone[end:]
    if zone in ("Z", "z"):
        zone = "+00:00"
    if len(zone) != 6 or zone[0] not in "+-":
        raise ValueError(f"{text!r} has no time zone (RFC 3339 needs Z or ±hh:mm)")
    micro = (fraction + "000000")[:6] if fraction else ""
    parsed = datetime.fromisoformat(f"{head}{'.' + micro if micro else ''}{zone}")
    return parsed.astimezone(timezone.utc)


def unix_ns(moment: datetime) -> int:
    """Nanoseconds since the Unix epoch, the score Go uses for delayed tasks."""
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
