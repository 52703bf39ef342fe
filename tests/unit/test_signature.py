"""The task message: Go's 19 keys in Go's order, and decoding as leniently and strictly as Go (docs/wire.md §1-2)."""

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from machinery import Arg, MessageDecodeError, Signature
from machinery.signature import new_task_uuid

GO_KEYS = [
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
]

# interop/redis_task_add.json, as the Go client pushed it.
GO_ADD = (
    b'{"UUID":"task_b01476d0-d092-439c-affd-85ce86a25bf2","Name":"add","RoutingKey":"machinery_tasks","ETA":null,'
    b'"GroupUUID":"","GroupTaskCount":0,"Args":[{"Name":"","Type":"int64","Value":1},{"Name":"","Type":"int64",'
    b'"Value":1}],"Headers":{},"Priority":0,"Immutable":false,"RetryCount":0,"RetryTimeout":0,"OnSuccess":null,'
    b'"OnError":null,"ChordCallback":null,"BrokerMessageGroupId":"","SQSReceiptHandle":"",'
    b'"StopTaskDeletionOnError":false,"IgnoreWhenTaskNotRegistered":false}'
)


def parsed(signature: Signature) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(signature.encode())
    return out


# --------------------------------------------------------------------------- encoding


def test_nineteen_keys_in_gos_order() -> None:
    data = parsed(Signature("add", [1, 2]))
    assert list(data) == GO_KEYS


def test_nested_signatures_have_all_keys_too() -> None:
    inner = Signature("multiply", [4])
    data = parsed(Signature("add", [1], on_success=[inner], on_error=[inner], chord_callback=inner))
    for nested in (data["OnSuccess"][0], data["OnError"][0], data["ChordCallback"]):
        assert list(nested) == GO_KEYS


def test_empty_values_are_written_like_go() -> None:
    data = parsed(Signature("noop"))
    assert data == {
        "UUID": "",
        "Name": "noop",
        "RoutingKey": "",
        "ETA": None,
        "GroupUUID": "",
        "GroupTaskCount": 0,
        "Args": None,  # nil slice -> null
        "Headers": None,  # nil map -> null
        "Priority": 0,
        "Immutable": False,
        "RetryCount": 0,
        "RetryTimeout": 0,
        "OnSuccess": None,
        "OnError": None,
        "ChordCallback": None,
        "BrokerMessageGroupId": "",
        "SQSReceiptHandle": "",
        "StopTaskDeletionOnError": False,
        "IgnoreWhenTaskNotRegistered": False,
    }


def test_null_versus_empty() -> None:
    data = parsed(Signature("noop", [], headers={}, on_success=[], on_error=[]))
    assert data["Args"] == []
    assert data["Headers"] == {}
    assert data["OnSuccess"] == []
    assert data["OnError"] == []


def test_args_are_written_as_go_args() -> None:
    data = parsed(Signature("f", [1, 2.5, 3.0, "s", b"hi", [1.0, 2.0], True, Arg("uint64", 2**64 - 1, "big")]))
    assert data["Args"] == [
        {"Name": "", "Type": "int64", "Value": 1},
        {"Name": "", "Type": "float64", "Value": 2.5},
        {"Name": "", "Type": "float64", "Value": 3},
        {"Name": "", "Type": "string", "Value": "s"},
        {"Name": "", "Type": "[]byte", "Value": "aGk="},
        {"Name": "", "Type": "[]float64", "Value": [1, 2]},
        {"Name": "", "Type": "bool", "Value": True},
        {"Name": "big", "Type": "uint64", "Value": 18446744073709551615},
    ]


def test_integral_floats_are_written_as_integers() -> None:
    body = Signature("f", [3.0, [1.0, 2.0]]).encode()
    assert b'"Type":"float64","Value":3}' in body
    assert b'"Value":[1,2]' in body
    assert b"3.0" not in body


def test_eta_is_written_in_utc_with_z() -> None:
    eta = datetime(2026, 11, 22, 12, 13, 13, 283107, tzinfo=timezone(timedelta(hours=2)))
    assert parsed(Signature("f", eta=eta))["ETA"] == "2026-11-22T10:13:13.283107Z"


def test_non_ascii_is_raw_utf8() -> None:
    assert "héllo".encode() in Signature("f", ["héllo"]).encode()


def test_same_bytes_as_go_for_a_go_message() -> None:
    assert Signature.decode(GO_ADD).encode() == GO_ADD


def test_new_task_uuid_style() -> None:
    uuid = new_task_uuid()
    assert uuid.startswith("task_") and len(uuid) == len("task_") + 36 and uuid == uuid.lower()
    assert new_task_uuid("chord_").startswith("chord_")
    assert new_task_uuid() != new_task_uuid()


# --------------------------------------------------------------------------- round trip


def full_signature() -> Signature:
    callback = Signature("multiply", [4], immutable=True)
    return Signature(
        "add",
        [1, 2.5, "s", b"hi", ["a"], True, Arg("uint64", 2**64 - 1)],
        uuid="task_1",
        routing_key="q",
        eta=datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=timezone.utc),
        group_uuid="group_1",
        group_task_count=3,
        headers={"trace": "abc"},
        priority=9,
        immutable=True,
        retry_count=2,
        retry_timeout=3,
        on_success=[callback],
        on_error=[Signature("on_error")],
        chord_callback=Signature("sum", uuid="chord_1"),
        broker_message_group_id="mg",
        sqs_receipt_handle="rh",
        stop_task_deletion_on_error=True,
        ignore_when_task_not_registered=True,
    )


def test_round_trip_keeps_every_field() -> None:
    original = full_signature()
    decoded = Signature.decode(original.encode())
    assert decoded.encode() == original.encode()
    assert decoded.uuid == "task_1" and decoded.routing_key == "q" and decoded.eta == original.eta
    assert decoded.group_uuid == "group_1" and decoded.group_task_count == 3
    assert decoded.headers == {"trace": "abc"} and decoded.priority == 9 and decoded.immutable
    assert (decoded.retry_count, decoded.retry_timeout) == (2, 3)
    assert decoded.on_success is not None and decoded.on_success[0].name == "multiply"
    assert decoded.on_success[0].immutable
    assert decoded.on_error is not None and decoded.on_error[0].name == "on_error"
    assert decoded.chord_callback is not None and decoded.chord_callback.uuid == "chord_1"
    assert decoded.broker_message_group_id == "mg" and decoded.sqs_receipt_handle == "rh"
    assert decoded.stop_task_deletion_on_error and decoded.ignore_when_task_not_registered


def test_decoded_args_keep_their_wire_values() -> None:
    # The worker converts them against the task's declared types; re-encoding must not change them.
    decoded = Signature.decode(Signature("f", [b"hi", 3.0]).encode())
    assert decoded.args == [Arg("[]byte", "aGk="), Arg("float64", 3)]
    assert parsed(decoded)["Args"][0]["Value"] == "aGk="


def test_round_trip_of_a_go_bytes_arg_is_not_corrupted() -> None:
    body = b'{"Name":"types","Args":[{"Name":"","Type":"[]byte","Value":"aGk="},{"Type":"[]uint8","Value":"aGk="}]}'
    again = Signature.decode(Signature.decode(body).encode())
    assert again.args == [Arg("[]byte", "aGk="), Arg("[]uint8", "aGk=")]


def test_copy_is_deep() -> None:
    original = full_signature()
    clone = original.copy()
    assert clone == original
    assert clone.args is not original.args
    assert clone.on_success is not None and original.on_success is not None
    clone.on_success[0].args = None
    assert original.on_success[0].args is not None


# --------------------------------------------------------------------------- lenient input (like Go's decoder)


def test_keys_are_case_insensitive() -> None:
    body = (
        b'{"uuid":"t_lower","name":"add","routingkey":"q","args":[{"type":"int64","value":9,"name":"n"}],'
        b'"retrycount":2,"IMMUTABLE":true,"headers":{"a":"b"}}'
    )
    decoded = Signature.decode(body)
    assert decoded.uuid == "t_lower"
    assert decoded.name == "add"
    assert decoded.routing_key == "q"
    assert decoded.args == [Arg("int64", 9, "n")]
    assert decoded.retry_count == 2
    assert decoded.immutable is True
    assert decoded.headers == {"a": "b"}


def test_unknown_keys_are_ignored() -> None:
    # e.g. the Michael-LiK fork's Index / ChainUUID / ChainTaskCount.
    decoded = Signature.decode(b'{"Name":"add","SomethingNew":42,"Index":1,"ChainUUID":"c","ChainTaskCount":2}')
    assert decoded.name == "add"
    assert list(parsed(decoded)) == GO_KEYS


def test_missing_keys_are_zero_values() -> None:
    decoded = Signature.decode(b'{"Name":"add"}')
    assert decoded == Signature("add")
    assert decoded.uuid == "" and decoded.args is None and decoded.headers is None and decoded.eta is None


def test_nulls_are_zero_values() -> None:
    decoded = Signature.decode(b'{"UUID":null,"Name":"add","GroupTaskCount":null,"Immutable":null,"Args":null}')
    assert decoded == Signature("add")


def test_non_string_header_values_are_kept_as_json_text() -> None:
    # Go readers cannot republish such values (docs/wire.md §10.6); we keep them readable but as strings.
    decoded = Signature.decode(b'{"Name":"add","Headers":{"a":"b","n":1,"o":{"x":1}}}')
    assert decoded.headers == {"a": "b", "n": "1", "o": '{"x":1}'}


def test_eta_with_offset_and_nanoseconds() -> None:
    decoded = Signature.decode(b'{"Name":"add","ETA":"2099-01-01T00:00:00.123456789+02:00"}')
    assert decoded.eta == datetime(2098, 12, 31, 22, 0, 0, 123456, tzinfo=timezone.utc)


def test_unknown_arg_type_decodes_and_is_left_to_the_worker() -> None:
    # Go's worker stores FAILURE "Reflect task args error: decimal is not one of supported types";
    # the message itself is fine, so it must decode.
    decoded = Signature.decode(b'{"Name":"add","Args":[{"Type":"decimal","Value":1}]}')
    assert decoded.args is not None and decoded.args[0].type == "decimal"
    assert parsed(decoded)["Args"] == [{"Name": "", "Type": "decimal", "Value": 1}]


# --------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"Name": "a"', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"add"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"Name":"a","ETA":"2020-01-01T00:00:00"}', "ETA"),  # naive: Go cannot decode it either
        (b'{"Name":"a","ETA":5}', "ETA"),
        (b'{"Name":1}', "Name must be a string"),
        (b'{"Name":"a","UUID":5}', "UUID must be a string"),
        (b'{"Name":"a","RetryCount":"1"}', "RetryCount must be an integer"),
        (b'{"Name":"a","RetryCount":1.5}', "RetryCount must be an integer"),
        (b'{"Name":"a","GroupTaskCount":true}', "GroupTaskCount must be an integer"),
        (b'{"Name":"a","Immutable":1}', "Immutable must be true or false"),
        (b'{"Name":"a","Args":{}}', "Args must be a list"),
        (b'{"Name":"a","Args":[1]}', "argument 0 is not an object"),
        (b'{"Name":"a","Args":[{"Value":1}]}', "argument 0 has no Type"),
        (b'{"Name":"a","Headers":[]}', "Headers must be an object"),
        (b'{"Name":"a","OnSuccess":{}}', "OnSuccess must be a list"),
        (b'{"Name":"a","OnError":[{"Name":2}]}', "Name must be a string"),
        (b'{"Name":"a","ChordCallback":5}', "not a JSON object"),
        (b'{"Name":"a","Priority":300}', "priority"),
    ],
)
def test_decode_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(MessageDecodeError) as info:
        Signature.decode(body)
    assert fragment in str(info.value)


def test_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Signature.decode(b"{")


# --------------------------------------------------------------------------- construction rules


def test_eta_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Signature("add", eta=datetime(2030, 1, 1))
    Signature("add", eta=datetime(2030, 1, 1, tzinfo=timezone.utc))


def test_header_values_must_be_strings() -> None:
    with pytest.raises(ValueError, match="header 'n'"):
        Signature("add", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="must map a string to a string"):
        Signature("add", headers={"o": {"x": "y"}})  # type: ignore[dict-item]
    assert Signature("add", headers={"k": "v"}).headers == {"k": "v"}


def test_args_are_typed_and_checked_at_construction() -> None:
    assert Signature("add", (1, 2)).args == [Arg("int64", 1), Arg("int64", 2)]
    with pytest.raises(ValueError, match="argument 1 of 'add'"):
        Signature("add", [1, {"a": 1}])
    with pytest.raises(ValueError, match="args must be a list"):
        Signature("add", "12")  # type: ignore[arg-type]


def test_priority_range() -> None:
    with pytest.raises(ValueError, match="0-255"):
        Signature("add", priority=256)
    with pytest.raises(ValueError, match="0-255"):
        Signature("add", priority=-1)


def test_name_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="task name"):
        Signature(5)  # type: ignore[arg-type]
