"""Our MongoDB documents, pinned byte for byte (BSON) against Go's shapes (docs/wire.md §11.4),
and Go-shaped documents decoded. No server: the documents are built and read by pure
functions; the backend against a real server is tested in tests/drivers/test_mongo.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import bson
from bson.int64 import Int64
from bson.son import SON

from machinery.backends._mongo_documents import (
    decode_group,
    decode_task,
    encode_result,
    group_document,
    state_update,
)
from machinery.backends.mongo import mongo_uri
from machinery.state import FAILURE, PENDING, RECEIVED, RETRY, STARTED, SUCCESS, GroupMeta, TaskState
from machinery.types import TaskResult, decode_results, encode_results

NOW = datetime(2026, 11, 22, 10, 13, 5, 576957, tzinfo=timezone.utc)
NOW_MS = datetime(2026, 11, 22, 10, 13, 5, 576000, tzinfo=timezone.utc)
EXPIRE_IN = 3600


def same_bson(ours: dict[str, Any], go: SON[str, Any]) -> None:
    assert bson.encode(ours) == bson.encode(go), (ours, go)


def test_pending_sets_state_name_and_creation_time_in_ms() -> None:
    ours = state_update(TaskState("task_1", PENDING, "add", created_at=NOW), NOW, EXPIRE_IN)
    same_bson(ours, SON([("state", "PENDING"), ("task_name", "add"), ("created_at", NOW_MS)]))


def test_intermediate_states_set_the_state_only() -> None:
    for state in (RECEIVED, STARTED, RETRY):
        same_bson(state_update(TaskState("task_1", state, "add"), NOW, EXPIRE_IN), SON([("state", state)]))


def test_success_sets_results_with_gos_bson_types_and_delete_at() -> None:
    results = [
        TaskResult("int64", 2),
        TaskResult("int", 7),
        TaskResult("int", 2**40),
        TaskResult("float64", 1.5),
        TaskResult("float64", 2),
        TaskResult("bool", True),
        TaskResult("string", "plain"),
        TaskResult("[]int64", [1, 2]),
        TaskResult("uint8", 3),
    ]
    ours = state_update(TaskState("task_1", SUCCESS, "add", results), NOW, EXPIRE_IN)
    go = SON(
        [
            ("state", "SUCCESS"),
            (
                "results",
                [
                    SON([("type", "int64"), ("value", Int64(2))]),
                    SON([("type", "int"), ("value", 7)]),  # int32: Go's int while it fits
                    SON([("type", "int"), ("value", Int64(2**40))]),
                    SON([("type", "float64"), ("value", 1.5)]),
                    SON([("type", "float64"), ("value", 2.0)]),
                    SON([("type", "bool"), ("value", True)]),
                    SON([("type", "string"), ("value", "plain")]),
                    SON([("type", "[]int64"), ("value", [Int64(1), Int64(2)])]),
                    SON([("type", "uint8"), ("value", 3)]),
                ],
            ),
            ("delete_at", NOW_MS + timedelta(seconds=EXPIRE_IN)),
        ]
    )
    same_bson(ours, go)


def test_failure_sets_the_error_and_delete_at() -> None:
    ours = state_update(TaskState("task_1", FAILURE, "add", error="boom"), NOW, EXPIRE_IN)
    same_bson(ours, SON([("state", "FAILURE"), ("error", "boom"), ("delete_at", NOW_MS + timedelta(seconds=3600))]))


def test_gos_json_quirk_on_string_results() -> None:
    # Objects (trailing text ignored) and null become "json" documents with double numbers ...
    assert encode_result(TaskResult("string", '{"a": 1, "b": [2]} tail')) == {
        "type": "json",
        "value": {"a": 1.0, "b": [2.0]},
    }
    assert encode_result(TaskResult("string", " null")) == {"type": "json", "value": None}
    # ... arrays, numbers, quoted strings and "" stay strings.
    for text in ("[1]", "5", '"q"', "", "{not json"):
        assert encode_result(TaskResult("string", text)) == {"type": "string", "value": text}


def test_group_document_is_gos_insert() -> None:
    ours = group_document(GroupMeta("group_1", ["task_a", "task_b"], created_at=NOW), NOW)
    go = SON(
        [
            ("_id", "group_1"),
            ("task_uuids", ["task_a", "task_b"]),
            ("chord_triggered", False),
            ("lock", False),
            ("created_at", NOW_MS),
        ]
    )
    same_bson(ours, go)


def go_task_document() -> dict[str, Any]:
    """A finished task as Go leaves it: the accumulated fields of PENDING, STARTED, SUCCESS,
    round-tripped through BSON (so int32 and int64 are what the server returns)."""
    raw = bson.encode(
        SON(
            [
                ("_id", "task_go"),
                ("state", "SUCCESS"),
                ("task_name", "add"),
                ("created_at", NOW_MS),
                (
                    "results",
                    [
                        SON([("type", "int64"), ("value", Int64(5))]),
                        SON([("type", "int"), ("value", 5)]),
                        SON([("type", "[]string"), ("value", ["a", "b"])]),
                        SON([("type", "json"), ("value", SON([("a", 1.0), ("b", 2.5)]))]),
                    ],
                ),
                ("delete_at", NOW_MS),
            ]
        )
    )
    return bson.decode(raw, codec_options=bson.CodecOptions(tz_aware=True))


def test_a_go_task_document_decodes() -> None:
    state = decode_task(go_task_document())
    assert (state.task_uuid, state.state, state.task_name, state.created_at) == ("task_go", SUCCESS, "add", NOW_MS)
    assert state.results == [
        TaskResult("int64", 5),
        TaskResult("int", 5),
        TaskResult("[]string", ["a", "b"]),
        TaskResult("string", '{"a":1,"b":2.5}'),  # Go's json entry, back as the string it was
    ]
    assert decode_results(state.results[:1]) == 5


def test_a_task_first_seen_at_received_and_an_old_ttl_datetime() -> None:
    state = decode_task({"_id": "t", "state": "RECEIVED", "ttl": NOW_MS})
    assert (state.task_name, state.created_at, state.results, state.ttl) == ("", None, None, 0)


def test_a_go_group_document_decodes() -> None:
    meta = decode_group({"_id": "g", "task_uuids": ["a", "b"], "chord_triggered": True, "lock": False})
    assert (meta.group_uuid, meta.task_uuids, meta.chord_triggered) == ("g", ["a", "b"], True)


def test_our_results_round_trip_through_bson() -> None:
    results = encode_results((3, 2.5, "x", [1, 2], True))
    stored = state_update(TaskState("t", SUCCESS, "f", results), NOW, EXPIRE_IN)
    document = bson.decode(bson.encode({"_id": "t", **stored}), codec_options=bson.CodecOptions(tz_aware=True))
    assert decode_results(decode_task(document).results) == (3, 2.5, "x", [1, 2], True)


def test_uris_are_prefixed_as_go_prefixes_them() -> None:
    assert mongo_uri("mongodb://h:27017") == "mongodb://h:27017"
    assert mongo_uri("mongodb+srv://cluster.example") == "mongodb+srv://cluster.example"
