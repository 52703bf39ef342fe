"""Go type names <-> Python values (docs/wire.md §3 and §4) and Go's time format (docs/wire.md §1.7)."""

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from machinery import Arg, ArgumentError, ResultTypeError, TaskResult
from machinery.types import (
    ZERO_TIME,
    convert_value,
    decode_results,
    encode_results,
    format_time,
    infer_arg,
    parse_time,
    unix_ns,
    wire_value,
)

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

# --------------------------------------------------------------------------- automatic typing


@pytest.mark.parametrize(
    ("value", "go_type"),
    [
        (True, "bool"),
        (False, "bool"),
        (0, "int64"),
        (-(2**63), "int64"),
        (INT64_MAX, "int64"),
        (1.5, "float64"),
        (2.0, "float64"),
        ("héllo", "string"),
        (b"hi", "[]byte"),
        (bytearray(b"hi"), "[]byte"),
        ([1, 2], "[]int64"),
        ((1, 2), "[]int64"),
        ([1.5, 2.5], "[]float64"),
        ([1, 2.5], "[]float64"),  # mixed int/float: Go reads ints as floats fine
        (["a", "b"], "[]string"),
        ([True, False], "[]bool"),
    ],
)
def test_infer_arg_types_plain_values(value: Any, go_type: str) -> None:
    arg = infer_arg(value, "argument 0")
    assert arg.type == go_type
    assert arg.value is value
    assert arg.name == ""


def test_bool_is_not_typed_as_int() -> None:
    # bool is a subclass of int in Python; Go must still see "bool".
    assert infer_arg(True, "x").type == "bool"
    assert infer_arg([True], "x").type == "[]bool"


def test_explicit_arg_is_kept_but_checked() -> None:
    arg = Arg("uint64", UINT64_MAX)
    assert infer_arg(arg, "argument 0") is arg
    with pytest.raises(ValueError, match="argument 3"):
        infer_arg(Arg("int8", "nope"), "argument 3")


def test_arg_refuses_unknown_type_name() -> None:
    with pytest.raises(ValueError, match="'decimal' is not one of the supported Go types"):
        Arg("decimal", 1)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"a": 1}, "dict"),
        (None, "NoneType"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "inf"),
        (2**63, "does not fit in int64"),
        (-(2**63) - 1, "does not fit in int64"),
        ([], "empty list"),
        ([[1, 2]], "one scalar type"),
        ([1, "a"], "one scalar type"),
        ([1.0, math.nan], "nan"),
        (object(), "object"),
    ],
)
def test_infer_arg_refuses_with_the_argument_named(value: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        infer_arg(value, "argument 2 of 'add'")
    message = str(info.value)
    assert message.startswith("argument 2 of 'add'")
    assert fragment in message


def test_big_int_hint_points_at_uint64() -> None:
    with pytest.raises(ValueError, match=r"Arg\('uint64', value\)"):
        infer_arg(2**63, "argument 0")
    assert infer_arg(Arg("uint64", 2**63), "argument 0").type == "uint64"
    with pytest.raises(ValueError, match="not a valid uint64"):
        infer_arg(Arg("uint64", 2**64), "argument 0")
    with pytest.raises(ValueError, match="not a valid uint64"):
        infer_arg(Arg("uint64", -1), "argument 0")


def test_explicit_narrow_int_is_range_checked_when_sending() -> None:
    assert infer_arg(Arg("int8", 127), "a").value == 127
    with pytest.raises(ValueError, match="not a valid int8"):
        infer_arg(Arg("int8", 128), "a")


def test_empty_slice_needs_an_explicit_type() -> None:
    assert infer_arg(Arg("[]int64", []), "a").type == "[]int64"


# --------------------------------------------------------------------------- wire values


@pytest.mark.parametrize(
    ("go_type", "value", "wire"),
    [
        ("[]byte", b"hi", "aGk="),
        ("[]uint8", b"hi", "aGk="),
        ("[]byte", "aGk=", "aGk="),  # a decoded message's value is already base64 text
        ("[]uint8", "aGk=", "aGk="),
        ("float64", 3.0, 3),  # Go writes integral floats without a fraction
        ("float64", 3.25, 3.25),
        ("float64", 1e21, 1e21),
        ("[]float64", [1.0, 2.5], [1, 2.5]),
        ("[]int64", (1, 2), [1, 2]),
        ("[]int64", None, None),
        ("uint64", UINT64_MAX, UINT64_MAX),
        ("string", "x", "x"),
    ],
)
def test_wire_value(go_type: str, value: Any, wire: Any) -> None:
    out = wire_value(go_type, value)
    assert out == wire
    assert type(out) is type(wire)


# --------------------------------------------------------------------------- receiving: docs/wire.md §3.2


@pytest.mark.parametrize(
    ("go_type", "raw", "expected"),
    [
        ("bool", True, True),
        ("int64", -5, -5),
        ("int", 7, 7),
        ("int64", INT64_MAX, INT64_MAX),
        ("int64", 9007199254740993, 9007199254740993),  # > 2**53 stays exact
        ("uint64", UINT64_MAX, UINT64_MAX),
        ("uint64", 0, 0),
        ("float64", 3, 3.0),  # floats may arrive as JSON integers
        ("float32", 1.5, 1.5),
        ("string", "héllo", "héllo"),
        ("[]byte", "aGk=", b"hi"),
        ("[]byte", [104, 105], b"hi"),
        ("[]uint8", "aGk=", b"hi"),
        ("[]uint16", "aGk=", [104, 105]),  # []uint* also take base64 text
        ("[]int64", [1, 2], [1, 2]),
        ("[]float64", [1, 2], [1.0, 2.0]),
        ("[]string", ["a"], ["a"]),
        ("[]int64", None, []),  # null slice -> empty
        ("[]string", None, []),
        ("[]byte", None, b""),
    ],
)
def test_convert_value(go_type: str, raw: Any, expected: Any) -> None:
    out = convert_value(go_type, raw)
    assert out == expected
    assert type(out) is type(expected)


@pytest.mark.parametrize(
    ("go_type", "raw", "fragment"),
    [
        ("int64", 1.0, "1.0"),  # Go: strconv.ParseInt: parsing "1.0": invalid syntax
        ("int64", "1", "'1' is not int64"),  # Go: 1 is not int64
        ("int64", True, "True is not int64"),
        ("int64", 2**63, "out of range for int64"),
        ("uint64", -1, "-1 is out of range for uint64"),  # Go refuses negative uints too
        ("uint64", 2**64, "out of range"),
        ("int8", 300, "out of range for int8"),
        ("bool", 1, "is not bool"),
        ("bool", None, "is not bool"),  # null for a scalar is an error
        ("string", None, "is not string"),
        ("string", 5, "is not string"),
        ("float64", "1.5", "is not a number"),
        ("float64", True, "is not a number"),
        ("[]int64", "aGk=", "is not []int64"),
        ("[]int64", [1, "2"], "is not int64"),
        ("[]byte", "!!not base64!!", "not valid base64"),
        ("[]byte", [300], "out of range for uint8"),
        ("decimal", 1, "decimal is not one of supported types"),  # Go's exact wording
        ("map[string]interface {}", {}, "map[string]interface {} is not one of supported types"),
    ],
)
def test_convert_value_refuses(go_type: str, raw: Any, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        convert_value(go_type, raw)
    assert fragment in str(info.value)


def test_unknown_type_error_is_exactly_gos() -> None:
    with pytest.raises(ArgumentError) as info:
        convert_value("decimal", 1)
    assert str(info.value) == "decimal is not one of supported types"


# --------------------------------------------------------------------------- results: docs/wire.md §4


def wire(results: list[TaskResult]) -> list[dict[str, Any]]:
    return [r.to_wire() for r in results]


def test_single_result() -> None:
    assert wire(encode_results(2)) == [{"Type": "int64", "Value": 2}]
    assert wire(encode_results("x")) == [{"Type": "string", "Value": "x"}]
    assert wire(encode_results(True)) == [{"Type": "bool", "Value": True}]
    assert wire(encode_results(["f", "o"])) == [{"Type": "[]string", "Value": ["f", "o"]}]


def test_float_results_are_written_like_go() -> None:
    out = wire(encode_results(3.0))
    assert out == [{"Type": "float64", "Value": 3}]
    assert type(out[0]["Value"]) is int
    assert wire(encode_results(4.2)) == [{"Type": "float64", "Value": 4.2}]


def test_bytes_result_looks_exactly_like_go() -> None:
    assert wire(encode_results(b"hi")) == [{"Type": "[]uint8", "Value": "aGk="}]
    assert wire(encode_results(Arg("[]byte", b"hi"))) == [{"Type": "[]uint8", "Value": "aGk="}]


def test_tuple_is_several_results_in_order() -> None:
    assert wire(encode_results((7, "3-4"))) == [{"Type": "int64", "Value": 7}, {"Type": "string", "Value": "3-4"}]


def test_none_and_empty_tuple_are_no_results() -> None:
    assert encode_results(None) == []
    assert encode_results(()) == []
    assert decode_results([]) is None
    assert decode_results(None) is None


def test_big_int_result_becomes_uint64() -> None:
    assert wire(encode_results(UINT64_MAX)) == [{"Type": "uint64", "Value": UINT64_MAX}]
    assert wire(encode_results(INT64_MAX)) == [{"Type": "int64", "Value": INT64_MAX}]


def test_arg_result_chooses_the_go_type() -> None:
    assert wire(encode_results((Arg("int", -7), Arg("uint64", 0)))) == [
        {"Type": "int", "Value": -7},
        {"Type": "uint64", "Value": 0},
    ]


@pytest.mark.parametrize(
    "returned",
    [{"a": 1}, {1, 2}, object(), math.nan, 2**64, [1, "a"], Arg("uint64", -1), Arg("int64", "x"), (1, {"b": 2})],
)
def test_results_without_a_go_type_raise_result_type_error(returned: Any) -> None:
    with pytest.raises(ResultTypeError, match="the task's result"):
        encode_results(returned)


def test_result_type_error_names_the_position() -> None:
    with pytest.raises(ResultTypeError, match="result 1"):
        encode_results((1, {"b": 2}))


@pytest.mark.parametrize(
    "returned",
    [2, "x", True, 4.5, b"hi", ["a", "b"], [1.5, 2.5], UINT64_MAX, (7, "3-4"), (b"", 0, [True])],
)
def test_results_round_trip(returned: Any) -> None:
    # Through the wire form, as a reader of the stored JSON sees them.
    stored = [TaskResult(r["Type"], r["Value"]) for r in wire(encode_results(returned))]
    assert decode_results(stored) == returned


def test_decode_results_refuses_types_no_reader_can_reflect() -> None:
    with pytest.raises(ArgumentError, match=r"main\.T is not one of supported types"):
        decode_results([TaskResult("main.T", {})])


# --------------------------------------------------------------------------- times: docs/wire.md §1.7


def test_format_time_is_utc_with_trimmed_fraction() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=plus2)) == "2026-01-02T01:04:05.12Z"
    assert format_time(datetime(2026, 1, 2, tzinfo=timezone.utc)) == "2026-01-02T00:00:00Z"
    assert format_time(datetime(2026, 1, 2, 0, 0, 0, 1, tzinfo=timezone.utc)) == "2026-01-02T00:00:00.000001Z"


def test_format_time_zero_time() -> None:
    assert format_time(None) == ZERO_TIME == "0001-01-01T00:00:00Z"
    assert parse_time(ZERO_TIME) is None


def test_format_time_refuses_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2026, 1, 2, 3, 4, 5))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Go writes nanoseconds; Python keeps microseconds (the rest is truncated).
        ("2026-11-22T10:13:13.283107786Z", datetime(2026, 11, 22, 10, 13, 13, 283107, tzinfo=timezone.utc)),
        ("2026-11-22T10:13:13Z", datetime(2026, 11, 22, 10, 13, 13, tzinfo=timezone.utc)),
        ("2026-11-22t10:13:13z", datetime(2026, 11, 22, 10, 13, 13, tzinfo=timezone.utc)),
        ("2026-11-22T10:13:13.5Z", datetime(2026, 11, 22, 10, 13, 13, 500000, tzinfo=timezone.utc)),
        ("2026-11-22T10:13:13.123456789012Z", datetime(2026, 11, 22, 10, 13, 13, 123456, tzinfo=timezone.utc)),
        ("2099-01-01T00:00:00+02:00", datetime(2098, 12, 31, 22, 0, 0, tzinfo=timezone.utc)),
        ("2026-11-22T10:13:13.5-05:30", datetime(2026, 11, 22, 15, 43, 13, 500000, tzinfo=timezone.utc)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "2020-01-01T00:00:00",
        "2020-01-01T00:00:00.123",
        "2020-01-01 00:00:00Z",
        "2020-01-01",
        "",
        "yesterday",
        "2020-01-01T00:00:00+0200",
    ],
)
def test_parse_time_refuses_naive_and_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_parse_time_refuses_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_time(12)  # type: ignore[arg-type]


def test_time_round_trip_at_microseconds() -> None:
    moment = datetime(2026, 11, 22, 10, 13, 13, 283107, tzinfo=timezone.utc)
    assert parse_time(format_time(moment)) == moment


def test_unix_ns_is_gos_delayed_score() -> None:
    # interop/redis_task_eta_zadd.json: ETA 2026-11-22T10:13:13.283107786Z was sent as 1795342393283107786;
    # Python keeps microseconds, so the last three digits are lost.
    eta = parse_time("2026-11-22T10:13:13.283107786Z")
    assert eta is not None
    assert unix_ns(eta) == 1795342393283107000
