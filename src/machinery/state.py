"""Task states and group metadata as the result backend stores them (docs/wire.md §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

import msgspec

from .errors import MessageDecodeError
from .types import TaskResult, format_time, parse_time

PENDING: Final = "PENDING"
RECEIVED: Final = "RECEIVED"
STARTED: Final = "STARTED"
RETRY: Final = "RETRY"
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
COMPLETED_STATES: Final = frozenset({SUCCESS, FAILURE})

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class TaskState:
    """The stored state of one task: its name, state, results or error, and when it was created."""

    task_uuid: str
    state: str
    task_name: str = ""
    results: list[TaskResult] | None = None
    error: str = ""
    created_at: datetime | None = None
    ttl: int = 0

    def is_completed(self) -> bool:
        return self.state in COMPLETED_STATES

    def is_success(self) -> bool:
        return self.state == SUCCESS

    def is_failure(self) -> bool:
        return self.state == FAILURE

    def to_wire(self) -> dict[str, Any]:
        return {
            "TaskUUID": self.task_uuid,
            "TaskName": self.task_name,
            "State": self.state,
            "Results": None if self.results is None else [r.to_wire() for r in self.results],
            "Error": self.error,
            "CreatedAt": format_time(self.created_at),
            "TTL": self.ttl,
        }

    def encode(self) -> bytes:
        return _encode_json(self.to_wire())

    @classmethod
    def decode(cls, body: bytes | str) -> TaskState:
        """Parse a stored state; raises ``MessageDecodeError`` if it is not one."""
        data = _decode_object(body, "task state")
        try:
            raw_results = data.get("results")
            return cls(
                task_uuid=str(data.get("taskuuid") or ""),
                task_name=str(data.get("taskname") or ""),
                state=str(data.get("state") or ""),
                results=None if raw_results is None else [_result(r) for r in raw_results],
                error=str(data.get("error") or ""),
                created_at=_created(data),
                ttl=int(data.get("ttl") or 0),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise MessageDecodeError(f"not a task state: {exc}") from None


@dataclass(slots=True)
class GroupMeta:
    """What the backend keeps about a group: its members in group order and the chord flag."""

    group_uuid: str
    task_uuids: list[str] = field(default_factory=list)
    chord_triggered: bool = False
    lock: bool = False
    created_at: datetime | None = None
    ttl: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "GroupUUID": self.group_uuid,
            "TaskUUIDs": self.task_uuids,
            "ChordTriggered": self.chord_triggered,
            "Lock": self.lock,
            "CreatedAt": format_time(self.created_at),
            "TTL": self.ttl,
        }

    def encode(self) -> bytes:
        return _encode_json(self.to_wire())

    @classmethod
    def decode(cls, body: bytes | str) -> GroupMeta:
        data = _decode_object(body, "group metadata")
        try:
            return cls(
                group_uuid=str(data.get("groupuuid") or ""),
                task_uuids=[str(u) for u in data.get("taskuuids") or []],
                chord_triggered=bool(data.get("chordtriggered")),
                lock=bool(data.get("lock")),
                created_at=_created(data),
                ttl=int(data.get("ttl") or 0),
            )
        except (TypeError, ValueError) as exc:
            raise MessageDecodeError(f"not group metadata: {exc}") from None


def _decode_object(body: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = _decode_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MessageDecodeError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise MessageDecodeError(f"{what} is nested too deeply to decode") from None
    if not isinstance(data, dict):
        raise MessageDecodeError(f"{what} is not a JSON object")
    return {str(key).lower(): value for key, value in data.items()}


def _result(raw: dict[str, Any]) -> TaskResult:
    folded = {str(key).lower(): value for key, value in raw.items()}
    return TaskResult(str(folded.get("type")), folded.get("value"))


def _created(data: dict[str, Any]) -> datetime | None:
    text = data.get("createdat")
    return parse_time(text) if isinstance(text, str) else None


@dataclass(slots=True)
class RunningTask:
    """A task a worker is running: what ``machinery inspect`` and the dashboard show."""

    task_uuid: str
    name: str
    started_at: datetime


@dataclass(slots=True)
class WorkerInfo:
    """What a live worker publishes about itself with every heartbeat (our own record; Go
    workers publish none)."""

    tag: str
    host: str
    pid: int
    queue: str
    concurrency: int
    tasks: list[str]
    started_at: datetime
    seen_at: datetime
    running: list[RunningTask] = field(default_factory=list)
    #: Tasks this worker has processed since it started (for throughput; 0 in older records).
    processed: int = 0

    def encode(self) -> bytes:
        return _encode_json(
            {
                "tag": self.tag,
                "host": self.host,
                "pid": self.pid,
                "queue": self.queue,
                "concurrency": self.concurrency,
                "tasks": self.tasks,
                "started_at": format_time(self.started_at),
                "seen_at": format_time(self.seen_at),
                "running": [
                    {"task_uuid": r.task_uuid, "name": r.name, "started_at": format_time(r.started_at)}
                    for r in self.running
                ],
                "processed": self.processed,
            }
        )

    @classmethod
    def decode(cls, body: bytes | str) -> WorkerInfo:
        """Parse a stored record; raises ``MessageDecodeError`` if it is not one."""
        data = _decode_object(body, "worker record")
        try:
            return cls(
                tag=str(data["tag"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                queue=str(data["queue"]),
                concurrency=int(data["concurrency"]),
                tasks=[str(t) for t in data["tasks"]],
                started_at=_moment(data["started_at"]),
                seen_at=_moment(data["seen_at"]),
                running=[
                    RunningTask(str(r["task_uuid"]), str(r["name"]), _moment(r["started_at"])) for r in data["running"]
                ],
                processed=int(data.get("processed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageDecodeError(f"not a worker record: {exc!r}") from None


def _moment(text: Any) -> datetime:
    moment = parse_time(str(text))
    if moment is None:
        raise ValueError(f"{text!r} is not a time")
    return moment


# --------------------------------------------------------------------------- beside the state

PROGRESS = "progress"
"""The annotation holding a task's latest progress, as JSON ``{"fraction": ..., "message": ...}``."""
TRACEBACK = "traceback"
"""The annotation holding the text of a failed task's traceback."""


def encode_progress(fraction: float, message: str) -> str:
    return _encode_json({"fraction": fraction, "message": message}).decode()


def parse_progress(value: str | None) -> tuple[float, str] | None:
    """(fraction, message) from a stored progress annotation, or None."""
    if value is None:
        return None
    try:
        data = _decode_json(value)
        return float(data["fraction"]), str(data["message"])
    except (msgspec.DecodeError, ValueError, KeyError, TypeError):
        return None
