"""The task message: ``Signature`` and its exact Go Machinery JSON form (docs/wire.md §1-2)."""

from __future__ import annotations

import copy
import itertools
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from .errors import MessageDecodeError
from .types import Arg, format_time, infer_arg, parse_time, wire_value

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def new_task_uuid(prefix: str = "task_") -> str:
    """A fresh id in Go Machinery's style: ``task_`` + a lower-case dashed UUIDv4."""
    return prefix + str(uuidlib.uuid4())


@dataclass(slots=True, eq=True)
class Signature:
    """One task invocation: its name, arguments and every routing and workflow field Go carries.

    Plain argument values are typed automatically (``int`` becomes ``int64`` and so on); pass
    ``Arg(type, value)`` to choose the Go type yourself. A value with no Go type raises ValueError.
    """

    name: str
    args: list[Arg] | None = None
    _: KW_ONLY
    uuid: str = ""
    routing_key: str = ""
    eta: datetime | None = None
    group_uuid: str = ""
    group_task_count: int = 0
    headers: dict[str, str] | None = None
    priority: int = 0
    immutable: bool = False
    retry_count: int = 0
    retry_timeout: int = 0
    on_success: list[Signature] | None = None
    on_error: list[Signature] | None = None
    chord_callback: Signature | None = None
    broker_message_group_id: str = ""
    sqs_receipt_handle: str = ""
    stop_task_deletion_on_error: bool = False
    ignore_when_task_not_registered: bool = False
    _raw_args: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"task name must be a string, got {self.name!r}")
        if self.args is not None and not self._raw_args:
            if isinstance(self.args, (str, bytes)) or not isinstance(self.args, Iterable):
                raise ValueError(f"args must be a list, got {self.args!r}")
            self.args = [infer_arg(value, f"argument {i} of {self.name!r}") for i, value in enumerate(self.args)]
        if self.eta is not None and (self.eta.tzinfo is None or self.eta.utcoffset() is None):
            raise ValueError(
                f"eta of {self.name!r} must be timezone-aware (Go rejects naive times); "
                "use datetime.now(timezone.utc) + timedelta(...)"
            )
        if self.headers is not None:
            for key, value in self.headers.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ValueError(
                        f"header {key!r} of {self.name!r} must map a string to a string "
                        "(Go workers cannot republish other header values)"
                    )
        if not 0 <= self.priority <= 255:
            raise ValueError(f"priority of {self.name!r} must be 0-255, got {self.priority}")
        self._raw_args = False

    def copy(self) -> Signature:
        """A deep copy, so that a sent copy and its template never share state."""
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ wire form

    def to_wire(self) -> dict[str, Any]:
        """The JSON object Go would marshal: all 19 keys, Go's names and order."""
        return {
            "UUID": self.uuid,
            "Name": self.name,
            "RoutingKey": self.routing_key,
            "ETA": format_time(self.eta) if self.eta is not None else None,
            "GroupUUID": self.group_uuid,
            "GroupTaskCount": self.group_task_count,
            "Args": None
            if self.args is None
            else [{"Name": a.name, "Type": a.type, "Value": wire_value(a.type, a.value)} for a in self.args],
            "Headers": self.headers,
            "Priority": self.priority,
            "Immutable": self.immutable,
            "RetryCount": self.retry_count,
            "RetryTimeout": self.retry_timeout,
            "OnSuccess": None if self.on_success is None else [s.to_wire() for s in self.on_success],
            "OnError": None if self.on_error is None else [s.to_wire() for s in self.on_error],
            "ChordCallback": None if self.chord_callback is None else self.chord_callback.to_wire(),
            "BrokerMessageGroupId": self.broker_message_group_id,
            "SQSReceiptHandle": self.sqs_receipt_handle,
            "StopTaskDeletionOnError": self.stop_task_deletion_on_error,
            "IgnoreWhenTaskNotRegistered": self.ignore_when_task_not_registered,
        }

    def encode(self) -> bytes:
        """The message bytes a broker carries."""
        return _encode_json(self.to_wire())

    @classmethod
    def decode(cls, body: bytes | str) -> Signature:
        """Parse message bytes as Go does: keys case-insensitive, unknown keys ignored.

        Raises ``MessageDecodeError`` naming the problem.
        """
        try:
            data = _decode_json(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise MessageDecodeError(f"message is not JSON: {exc}") from None
        except RecursionError:
            raise MessageDecodeError("message is nested too deeply to decode") from None
        try:
            return cls.from_wire(data)
        except MessageDecodeError:
            raise
        except RecursionError:
            raise MessageDecodeError("message nests its callbacks too deeply to decode") from None
        except Exception as exc:  # a reader must never be stopped by a message, whatever it holds
            raise MessageDecodeError(f"message cannot be decoded: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_wire(cls, data: Any) -> Signature:
        """Build a Signature from a decoded JSON object; raises ``MessageDecodeError``."""
        if not isinstance(data, Mapping):
            raise MessageDecodeError(f"message is not a JSON object but {type(data).__name__}")
        get = _folded_getter(data) if _needs_folding(data) else data.get
        try:
            eta_text = get("ETA")
            raw_args = get("Args")
            return cls(
                _string(get("Name"), "Name"),
                None if raw_args is None else [_decode_arg(a, i) for i, a in enumerate(_list(raw_args, "Args"))],
                uuid=_string(get("UUID"), "UUID"),
                routing_key=_string(get("RoutingKey"), "RoutingKey"),
                eta=None if eta_text is None else _time(eta_text),
                group_uuid=_string(get("GroupUUID"), "GroupUUID"),
                group_task_count=_int(get("GroupTaskCount"), "GroupTaskCount"),
                headers=_headers(get("Headers")),
                priority=_int(get("Priority"), "Priority"),
                immutable=_bool(get("Immutable"), "Immutable"),
                retry_count=_int(get("RetryCount"), "RetryCount"),
                retry_timeout=_int(get("RetryTimeout"), "RetryTimeout"),
                on_success=_signatures(get("OnSuccess"), "OnSuccess"),
                on_error=_signatures(get("OnError"), "OnError"),
                chord_callback=None if get("ChordCallback") is None else cls.from_wire(get("ChordCallback")),
                broker_message_group_id=_string(get("BrokerMessageGroupId"), "BrokerMessageGroupId"),
                sqs_receipt_handle=_string(get("SQSReceiptHandle"), "SQSReceiptHandle"),
                stop_task_deletion_on_error=_bool(get("StopTaskDeletionOnError"), "StopTaskDeletionOnError"),
                ignore_when_task_not_registered=_bool(
                    get("IgnoreWhenTaskNotRegistered"), "IgnoreWhenTaskNotRegistered"
                ),
                _raw_args=True,
            )
        except ValueError as exc:
            if isinstance(exc, MessageDecodeError):
                raise
            raise MessageDecodeError(str(exc)) from None


_WIRE_KEYS = frozenset(
    (
        "UUID",
        "Name",
        "RoutingKey",
        "ETA",
        "GroupUUID",
        "GroupTaskCount",
        "Args",
        "Headers",
        "Priority",
        "Immutable",
        "RetryCount",
        "RetryTimeout",
        "OnSuccess",
        "OnError",
        "ChordCallback",
        "BrokerMessageGroupId",
        "SQSReceiptHandle",
        "StopTaskDeletionOnError",
        "IgnoreWhenTaskNotRegistered",
    )
)


def _needs_folding(data: Mapping[str, Any]) -> bool:
    # Messages from Go and from us use the exact names; only hand-written ones need folding.
    return not _WIRE_KEYS.issuperset(data)


def _folded_getter(data: Mapping[str, Any]) -> Callable[[str], Any]:
    folded = {str(key).lower(): value for key, value in data.items()}
    return lambda key: folded.get(key.lower())


def _string(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MessageDecodeError(f"{key} must be a string, got {value!r}")
    return value


def _int(value: Any, key: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageDecodeError(f"{key} must be an integer, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MessageDecodeError(f"{key} must be true or false, got {value!r}")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise MessageDecodeError(f"{key} must be a list, got {value!r}")
    return value


def _time(value: Any) -> datetime | None:
    try:
        return parse_time(value)
    except (ValueError, TypeError) as exc:
        raise MessageDecodeError(f"ETA: {exc}") from None


def _headers(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MessageDecodeError(f"Headers must be an object, got {value!r}")
    # Go peers may send non-string header values; keep them readable but never re-send them as such.
    return {str(k): v if isinstance(v, str) else _encode_json(v).decode() for k, v in value.items()}


def _signatures(value: Any, key: str) -> list[Signature] | None:
    if value is None:
        return None
    return [Signature.from_wire(item) for item in _list(value, key)]


def _decode_arg(raw: Any, position: int) -> Arg:
    if not isinstance(raw, Mapping):
        raise MessageDecodeError(f"argument {position} is not an object: {raw!r}")
    folded = {k.lower(): v for k, v in raw.items()}
    go_type = folded.get("type")
    if not isinstance(go_type, str):
        raise MessageDecodeError(f"argument {position} has no Type")
    try:
        return Arg.from_wire(go_type, folded.get("value"), _string(folded.get("name"), "Name"))
    except ValueError as exc:
        raise MessageDecodeError(f"argument {position}: {exc}") from None


# --------------------------------------------------------------------------- workflows (docs/wire.md §8)


def _member(signature: Signature, what: str) -> Signature:
    """A shallow copy of ``signature`` for a workflow, with a UUID.

    Workflows set top-level fields (UUID, OnSuccess, GroupUUID, ChordCallback, and at send
    time Headers and RoutingKey) on their members, so a shallow copy keeps the caller's
    signature reusable in other workflows without paying for a deep copy per member.
    """
    if not isinstance(signature, Signature):
        raise TypeError(f"a {what} holds Signatures, got {signature!r}")
    member = copy.copy(signature)
    if not member.uuid:
        member.uuid = new_task_uuid()
    return member


def _flatten(signatures: tuple[Any, ...]) -> tuple[Any, ...]:
    # Accept Group(a, b) as well as Group([a, b]).
    if len(signatures) == 1 and isinstance(signatures[0], (list, tuple)):
        return tuple(signatures[0])
    return signatures


class Chain:
    """Signatures run one after another, each receiving the previous one's results.

    Built as Go's ``NewChain``: every step gets a ``task_`` UUID if it has none, and step
    *i* becomes step *i-1*'s only ``OnSuccess`` callback, so the whole chain travels nested
    inside the first message. Whether a step's results are appended to the next step's
    arguments depends on the *finished* step's ``immutable`` flag (Go's rule, docs/wire.md §6.3).

    The chain holds copies of the given signatures: read the UUIDs from ``signatures``.
    """

    def __init__(self, *signatures: Signature) -> None:
        steps = [_member(s, "chain") for s in _flatten(signatures)]
        if not steps:
            raise ValueError("a chain needs at least one signature")
        for previous, step in itertools.pairwise(steps):
            previous.on_success = [step]
        self.signatures: list[Signature] = steps

    @property
    def task_uuids(self) -> list[str]:
        """The steps' UUIDs in order; the last one holds the chain's result."""
        return [s.uuid for s in self.signatures]

    def __repr__(self) -> str:
        return f"<Chain {' -> '.join(s.name for s in self.signatures)}>"


class Group:
    """Signatures run in parallel, known to the result backend as one group.

    Built as Go's ``NewGroup``: a ``group_`` UUID, and on every member a UUID (if it has
    none), that ``GroupUUID`` and ``GroupTaskCount``. Holds copies of the given signatures.
    """

    def __init__(self, *signatures: Signature) -> None:
        given = _flatten(signatures)
        self.group_uuid = new_task_uuid("group_")
        members = [_member(s, "group") for s in given]
        for member in members:
            member.group_uuid = self.group_uuid
            member.group_task_count = len(members)
        if len({m.uuid for m in members}) != len(members):
            raise ValueError("the members of a group must have distinct UUIDs")
        self.signatures: list[Signature] = members

    @property
    def task_uuids(self) -> list[str]:
        """The members' UUIDs in group order (the order results are collected in)."""
        return [s.uuid for s in self.signatures]

    def __len__(self) -> int:
        return len(self.signatures)

    def __repr__(self) -> str:
        return f"<Group {self.group_uuid} of {len(self.signatures)}>"


class Chord:
    """A group whose members' results, in group order, feed one callback.

    Built as Go's ``NewChord``: the callback gets a ``chord_`` UUID if it has none and is
    embedded in full in every member. It is published once, by the worker that finishes the
    group; its own ``immutable`` flag decides whether the members' results are appended.
    ``group`` may be a Group (used as is) or signatures to make one from.
    """

    def __init__(self, group: Group | Iterable[Signature], callback: Signature) -> None:
        if not isinstance(group, Group):
            group = Group(*group)
        if not group.signatures:
            raise ValueError("a chord needs at least one member, or its callback could never run")
        if not isinstance(callback, Signature):
            raise TypeError(f"a chord callback must be a Signature, got {callback!r}")
        callback = copy.copy(callback)
        if not callback.uuid:
            callback.uuid = new_task_uuid("chord_")
        for member in group.signatures:
            member.chord_callback = callback
        self.group = group
        self.callback = callback

    def __repr__(self) -> str:
        return f"<Chord {self.group.group_uuid} of {len(self.group)} -> {self.callback.name}>"
