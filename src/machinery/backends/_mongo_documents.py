"""Go Machinery's MongoDB documents (docs/wire.md §11.4), built and read without a server.

Task documents (collection ``tasks``, ``_id`` = task UUID) are written with
``updateOne({_id}, {$set: <fields>}, upsert)``, the fields depending on the state, so they
accumulate: PENDING sets ``state, task_name, created_at``; RECEIVED/STARTED/RETRY set ``state``;
SUCCESS sets ``state, results, delete_at``; FAILURE sets ``state, error, delete_at``. Results
are ``{type, value}`` with the value in the BSON type Go's driver gives the Go value, and Go's
quirk: a string that parses as a JSON object (or is ``null``) is stored as ``{type: "json",
value: <document>}``. Group documents (``group_metas``) are inserted once as ``_id,
task_uuids, chord_triggered, lock, created_at``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from bson.int64 import Int64

from ..state import FAILURE, PENDING, SUCCESS, GroupMeta, TaskState
from ..types import TaskResult

#: Go types the driver writes as BSON int32 (Go ``int`` too, while it fits).
_INT32_TYPES = frozenset({"int8", "int16", "int32", "uint8", "uint16"})
#: Go types the driver writes as BSON int64.
_INT64_TYPES = frozenset({"int64", "uint", "uint32", "uint64"})
_INT32_RANGE = (-(2**31), 2**31 - 1)


def _ms(moment: datetime) -> datetime:
    """BSON datetimes hold milliseconds, in UTC."""
    moment = moment.astimezone(timezone.utc)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def state_update(state: TaskState, now: datetime, expire_in: int) -> dict[str, Any]:
    """The ``$set`` document Go writes for ``state``, in Go's field order."""
    fields: dict[str, Any] = {"state": state.state}
    if state.state == PENDING:
        fields["task_name"] = state.task_name
        fields["created_at"] = _ms(state.created_at or now)
    elif state.state == SUCCESS:
        fields["results"] = [encode_result(r) for r in state.results or []]
        fields["delete_at"] = _ms(now + timedelta(seconds=expire_in))
    elif state.state == FAILURE:
        fields["error"] = state.error
        fields["delete_at"] = _ms(now + timedelta(seconds=expire_in))
    return fields


def encode_result(result: TaskResult) -> dict[str, Any]:
    """``{type, value}`` as Go's ``decodeResults`` and driver store ``result``."""
    if result.type == "string" and isinstance(result.value, str):
        parsed = _go_json_document(result.value)
        if parsed is not _NOT_JSON:
            return {"type": "json", "value": parsed}
    return {"type": result.type, "value": _bson_value(result.type, result.value)}


def _bson_value(go_type: str, value: Any) -> Any:
    if go_type.startswith("[]") and isinstance(value, list):
        element = go_type[2:]
        return [_bson_value(element, item) for item in value]
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    if go_type in ("float32", "float64"):
        return float(value)  # a double, as Go's float
    if go_type in _INT64_TYPES:
        return Int64(value)
    if go_type in _INT32_TYPES:
        return value  # pymongo writes a Python int that fits as int32
    if go_type == "int":
        return value if _INT32_RANGE[0] <= value <= _INT32_RANGE[1] else Int64(value)
    return value


class _NotJson:
    pass


_NOT_JSON = _NotJson()


def _go_json_document(text: str) -> Any:
    """What Go's ``json.NewDecoder(strings.NewReader(s)).Decode(&map)`` yields: a document
    (numbers as doubles) when the first JSON value is an object, None for ``null``; else
    ``_NOT_JSON``. Text after the first value is ignored, as Go's Decoder ignores it."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.lstrip(" \t\r\n"))
    except ValueError:
        return _NOT_JSON
    if value is None:
        return None
    if isinstance(value, dict):
        return _as_doubles(value)
    return _NOT_JSON


def _as_doubles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_doubles(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def decode_task(document: Mapping[str, Any]) -> TaskState:
    """A task document, Go's or ours, as a TaskState (fields it lacks stay empty)."""
    raw = document.get("results")
    created = document.get("created_at")
    return TaskState(
        task_uuid=str(document.get("_id", "")),
        state=str(document.get("state") or ""),
        task_name=str(document.get("task_name") or ""),
        results=None if raw is None else [decode_result(item) for item in raw],
        error=str(document.get("error") or ""),
        created_at=created.replace(tzinfo=timezone.utc) if isinstance(created, datetime) else None,
        ttl=_ttl(document.get("ttl")),
    )


def _ttl(value: Any) -> int:
    """The ``ttl`` field: an integer in Go's TaskState; older Go releases wrote their expiry
    time there as a datetime (since renamed ``delete_at``), which is not a TTL: read as 0."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def decode_result(item: Mapping[str, Any]) -> TaskResult:
    """One ``{type, value}``; int32 and int64 alike become Python ints. Go's ``json`` entries
    (strings it stored as documents) come back as the JSON text of the document."""
    go_type = str(item.get("type", ""))
    value = _plain(item.get("value"))
    if go_type == "json":
        return TaskResult("string", json.dumps(_integral(value), separators=(",", ":")))
    return TaskResult(go_type, value)


def _plain(value: Any) -> Any:
    if isinstance(value, Int64):
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _integral(value: Any) -> Any:
    """Doubles that hold whole numbers written back as integers (Go turned ``1`` into ``1.0``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def group_document(meta: GroupMeta, now: datetime) -> dict[str, Any]:
    """The document Go's ``InitGroup`` inserts (``ttl`` omitted, as Go's omitempty drops it)."""
    return {
        "_id": meta.group_uuid,
        "task_uuids": list(meta.task_uuids),
        "chord_triggered": meta.chord_triggered,
        "lock": meta.lock,
        "created_at": _ms(meta.created_at or now),
    }


def decode_group(document: Mapping[str, Any]) -> GroupMeta:
    created = document.get("created_at")
    return GroupMeta(
        group_uuid=str(document.get("_id", "")),
        task_uuids=[str(u) for u in document.get("task_uuids") or []],
        chord_triggered=bool(document.get("chord_triggered")),
        lock=bool(document.get("lock")),
        created_at=created.replace(tzinfo=timezone.utc) if isinstance(created, datetime) else None,
        ttl=_ttl(document.get("ttl")),
    )


__all__ = ["decode_group", "decode_result", "decode_task", "encode_result", "group_document", "state_update"]
