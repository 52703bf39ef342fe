"""Go Machinery's DynamoDB items (docs/wire.md §11.5), the tables, and one client per loop.

Attribute names and types are Go's ``attributevalue.MarshalMap`` of TaskState and GroupMeta;
result values are Go's ``fmt.Sprintf("%v")`` text, which Go reads back as strings. Because that
text loses information (``[]string{"a b"}`` and ``[]string{"a", "b"}`` print alike), the exact
results are also kept as JSON in ``MachineryResults``, which Go ignores and Python prefers.
"""

from __future__ import annotations

import base64
import binascii
import struct
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import msgspec
from botocore.exceptions import ClientError

from .. import log
from ..config import Config, DynamoDBConfig
from ..errors import ConfigError
from ..state import GroupMeta, TaskState
from ..types import BYTE_SLICE_TYPES, FLOAT_TYPES, INT_RANGES, TaskResult, format_time, parse_time
from .aws import AWSClients, endpoint_for, error_code

#: The attribute beside Go's that keeps the results exactly (JSON of Go's TaskResult list).
EXACT_RESULTS = "MachineryResults"
#: Prefix of items machinery keeps in the group metadata table beside Go's groups.
CONTROL_PREFIX = "machinery:"


def dynamodb_clients(config: Config, url: str) -> AWSClients:
    section = config.dynamodb
    return AWSClients("dynamodb", "DynamoDB", url, endpoint_for("DYNAMODB", section.endpoint_url, url), section.region)


def expires_at(config: Config) -> int:
    """Go's TTL value: now + results_expire_in, in Unix seconds."""
    return int(time.time()) + config.results_ttl


# ---------------------------------------------------------------------------- Go's %v text


def go_text(go_type: str, value: Any) -> str:
    """``fmt.Sprintf("%v", value)`` for a result of ``go_type`` as the wire carries it."""
    if value is None:
        return "<nil>"
    if go_type in BYTE_SLICE_TYPES and isinstance(value, str):
        value = list(base64.b64decode(value))
    if go_type.startswith("[]"):
        element = go_type[2:]
        if isinstance(value, str):  # []uint* as base64 text
            value = list(base64.b64decode(value))
        return "[" + " ".join(go_text(element, v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if go_type in FLOAT_TYPES:
        return _go_float(float(value), go_type == "float32")
    return str(value)


def _go_float(value: float, single: bool) -> str:
    """strconv.FormatFloat(v, 'g', -1, bits): shortest digits, exponent below 1e-4 and from 1e+06."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    text = _shortest32(value) if single else repr(value)
    sign, digits, exponent = Decimal(text).normalize().as_tuple()
    assert isinstance(exponent, int)
    if digits == (0,):
        return "-0" if sign else "0"
    point = len(digits) + exponent  # digits before the decimal point
    exp = point - 1
    minus = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return minus + format(Decimal((0, digits, exponent)), "f")


def _shortest32(value: float) -> str:
    target = struct.unpack("f", struct.pack("f", value))[0]
    for precision in range(1, 10):
        text = f"{target:.{precision}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == target:
            return text
    return repr(target)


def from_go_text(go_type: str, text: str) -> Any:
    """The wire value of a result Go stored as ``%v`` text (lossy for ``[]string`` with spaces)."""
    if go_type.startswith("[]"):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        parts = inner.split(" ") if inner else []
        element = go_type[2:]
        values = [from_go_text(element, p) for p in parts]
        if go_type in BYTE_SLICE_TYPES:
            return base64.b64encode(bytes(values)).decode("ascii")
        return values
    if text == "<nil>":
        return None
    try:
        if go_type == "bool":
            return text == "true"
        if go_type in INT_RANGES:
            return int(text)
        if go_type in FLOAT_TYPES:
            number = float(text)
            return int(number) if number.is_integer() and abs(number) < 1e21 else number
    except ValueError:
        return text
    return text


# ---------------------------------------------------------------------------- items


def s(value: str) -> dict[str, Any]:
    return {"S": value}


def n(value: int) -> dict[str, Any]:
    return {"N": str(value)}


def results_value(results: Sequence[TaskResult] | None) -> dict[str, Any]:
    """Go's ``Results`` attribute: NULL for nil, else a list of {Type, Value as %v text}."""
    if results is None:
        return {"NULL": True}
    return {"L": [{"M": {"Type": s(r.type), "Value": s(go_text(r.type, r.value))}} for r in results]}


def exact_results(results: Sequence[TaskResult]) -> dict[str, Any]:
    return s(msgspec.json.encode([r.to_wire() for r in results]).decode())


def state_item(state: TaskState, ttl: int) -> dict[str, Any]:
    """The whole item Go's ``initTaskState`` puts (plus the exact results, when not None)."""
    item = {
        "TaskUUID": s(state.task_uuid),
        "TaskName": s(state.task_name),
        "State": s(state.state),
        "Results": results_value(state.results),
        "Error": s(state.error),
        "CreatedAt": s(format_time(state.created_at)),
        "TTL": n(ttl),
    }
    if state.results is not None:
        item[EXACT_RESULTS] = exact_results(state.results)
    return item


def state_from_item(item: dict[str, Any]) -> TaskState | None:
    """A stored item as a TaskState; None for an item with no state (an annotation only)."""
    state = _text(item.get("State"))
    if not state:
        return None
    results: list[TaskResult] | None = None
    exact = _text(item.get(EXACT_RESULTS))
    if exact:
        results = [TaskResult(str(r["Type"]), r["Value"]) for r in msgspec.json.decode(exact)]
    elif "L" in item.get("Results", {}):
        results = []
        for entry in item["Results"]["L"]:
            fields = entry.get("M", {})
            go_type = _text(fields.get("Type"))
            results.append(TaskResult(go_type, from_go_text(go_type, _text(fields.get("Value")))))
    created = _text(item.get("CreatedAt"))
    return TaskState(
        task_uuid=_text(item.get("TaskUUID")),
        state=state,
        task_name=_text(item.get("TaskName")),
        results=results,
        error=_text(item.get("Error")),
        created_at=_parse_created(created),
        ttl=int(item.get("TTL", {}).get("N", "0")),
    )


def group_item(meta: GroupMeta, ttl: int) -> dict[str, Any]:
    """Go's ``InitGroup`` item."""
    return {
        "GroupUUID": s(meta.group_uuid),
        "TaskUUIDs": {"L": [s(u) for u in meta.task_uuids]},
        "ChordTriggered": {"BOOL": meta.chord_triggered},
        "Lock": {"BOOL": meta.lock},
        "CreatedAt": s(format_time(meta.created_at)),
        "TTL": n(ttl),
    }


def group_from_item(item: dict[str, Any]) -> GroupMeta:
    uuids = item.get("TaskUUIDs", {})
    members = [_text(v) for v in uuids.get("L", [])] if "L" in uuids else list(uuids.get("SS", []))
    return GroupMeta(
        group_uuid=_text(item.get("GroupUUID")),
        task_uuids=members,
        chord_triggered=bool(item.get("ChordTriggered", {}).get("BOOL", False)),
        lock=bool(item.get("Lock", {}).get("BOOL", False)),
        created_at=_parse_created(_text(item.get("CreatedAt"))),
        ttl=int(item.get("TTL", {}).get("N", "0")),
    )


def _text(value: dict[str, Any] | None) -> str:
    if not value:
        return ""
    return str(value.get("S", ""))


def _parse_created(text: str) -> Any:
    if not text:
        return None
    try:
        return parse_time(text)
    except (ValueError, binascii.Error):
        return None


# ---------------------------------------------------------------------------- tables

#: Hash key per table setting.
KEYS = {"task_states_table": "TaskUUID", "group_metas_table": "GroupUUID"}


async def check_tables(clients: AWSClients, section: DynamoDBConfig) -> None:
    """Make sure both tables exist: create them (TTL on) if asked, else name the missing one."""
    for setting, key in KEYS.items():
        table = getattr(section, setting)
        async with clients.call(f"looking up DynamoDB table {table!r}") as db:
            try:
                await db.describe_table(TableName=table)
                continue
            except ClientError as exc:
                if error_code(exc) != "ResourceNotFoundException":
                    raise
            if not section.create_tables:
                raise ConfigError(
                    f"DynamoDB table {table!r} (dynamodb.{setting}) does not exist: create it with hash key {key} "
                    "(type S) and TTL on the attribute TTL, or set DynamoDBConfig(create_tables=True)"
                )
            try:
                await db.create_table(
                    TableName=table,
                    AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                    BillingMode="PAY_PER_REQUEST",
                )
            except ClientError as exc:
                if error_code(exc) != "ResourceInUseException":  # another process created it first
                    raise
            waiter = db.get_waiter("table_exists")
            await waiter.wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
            try:
                await db.update_time_to_live(
                    TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "TTL"}
                )
            except ClientError as exc:
                if error_code(exc) != "ValidationException":  # already enabled
                    raise
            log.logger.info("Created DynamoDB table %r with TTL on its TTL attribute", table)
