"""Interop with payloads captured from a real Go Machinery v2 run (``tests/interop/captures/``, see its README).

1. Every captured message, task state and group metadata decodes, and re-encodes to JSON with the
   same keys, key order, JSON types and values. Timestamps are the one allowed difference: Go writes
   nanoseconds and Python's datetime keeps microseconds, so a re-encoded time must equal Go's text
   cut to microsecond precision (``2026-11-22T10:13:13.283107786Z`` -> ``...13.283107Z``). Where a
   payload has no sub-microsecond time, the bytes must be identical.
2. Captured results decode to the right Python values.
3. Captured Go messages processed by *our* worker (on ``memory://``) end in the same state, results
   and error as the Go worker stored, and what our worker publishes (chain steps, callbacks, retries)
   matches what the Go worker published.
4. The hand-written edge cases of ``go_worker_edge_cases.json`` end in a sensible state or a dead
   letter, never a stuck or crashed worker; where we deliberately differ from Go, the case says so.
"""

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from machinery import (
    FAILURE,
    PENDING,
    SUCCESS,
    Arg,
    Config,
    GroupMeta,
    RetryTaskLater,
    Server,
    Signature,
    TaskFailed,
    TaskState,
)
from machinery._sync import run_sync
from machinery.types import decode_results, parse_time, unix_ns
from support.configs import config_for, count_requeues, push_raw
from support.fixtures import unique
from support.interop import INTEROP_DIR
from support.waiting import WAIT, wait_until
from support.workers import running_worker

if not INTEROP_DIR.is_dir():
    pytest.skip(f"Go Machinery captures not found at {INTEROP_DIR}", allow_module_level=True)

EDGE_CASES_FILE = "go_worker_edge_cases.json"
TIME_KEYS = {"ETA", "CreatedAt"}
SUB_MICROSECOND = re.compile(r'\.\d{7,}Z"')
ANY_TIME = "0001-01-01T00:00:00Z"  # stands in for an ETA whose value is "now + delay" in each run


# --------------------------------------------------------------------------- reading the captures


@dataclass
class Payload:
    """One captured JSON payload: what it is, its exact text when the capture kept it, its parsed form."""

    id: str
    kind: str  # "signature", "state" or "group"
    raw: str | None  # exact bytes Go wrote (None when the capture re-formatted it)
    data: dict[str, Any]


def _kind(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "TaskUUIDs" in data:
        return "group"
    if "TaskUUID" in data:
        return "state"
    if "UUID" in data and "Name" in data:
        return "signature"
    return None


def _unwrap(file: str, raw: str, data: Any) -> list[Payload]:
    """The payloads in one capture, looking inside AMQP envelopes and Redis command records."""
    kind = _kind(data)
    if kind is not None:
        return [Payload(file, kind, raw, data)]
    if isinstance(data, dict) and isinstance(data.get("body"), str):  # AMQP envelope
        body = data["body"]
        return [Payload(f"{file}:body", "signature", body, json.loads(body))]
    if isinstance(data, dict) and isinstance(data.get("member"), dict):  # ZADD record (pretty-printed)
        return [Payload(f"{file}:member", "signature", None, data["member"])]
    if isinstance(data, dict) and data.get("command") == "SET" and isinstance(data.get("value"), dict):
        return [Payload(f"{file}:value", "state", None, data["value"])]
    return []


def load_payloads() -> list[Payload]:
    payloads: list[Payload] = []
    for path in sorted(INTEROP_DIR.glob("*.json")):
        if path.name == EDGE_CASES_FILE:
            continue
        text = path.read_text(encoding="utf-8").rstrip("\n")
        payloads += _unwrap(path.name, text, json.loads(text))
    for path in sorted(INTEROP_DIR.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                payloads += _unwrap(f"{path.name}:{number}", line, json.loads(line))
    return payloads


PAYLOADS = load_payloads()


def of_kind(kind: str) -> list[Any]:
    return [pytest.param(p, id=p.id) for p in PAYLOADS if p.kind == kind]


def capture(name: str) -> Any:
    return json.loads((INTEROP_DIR / name).read_text(encoding="utf-8"))


def capture_lines(name: str) -> list[Any]:
    return [json.loads(line) for line in (INTEROP_DIR / name).read_text(encoding="utf-8").splitlines() if line]


def test_every_json_capture_is_checked() -> None:
    covered = {p.id.split(":")[0] for p in PAYLOADS} | {EDGE_CASES_FILE}
    on_disk = {p.name for p in INTEROP_DIR.iterdir() if p.suffix in (".json", ".jsonl")}
    assert on_disk - covered == set(), "captures no test understands"
    kinds = {p.kind for p in PAYLOADS}
    assert kinds == {"signature", "state", "group"}
    assert len([p for p in PAYLOADS if p.kind == "signature"]) >= 40


# --------------------------------------------------------------------------- comparing JSON


def go_time_at_microseconds(text: str) -> str:
    """Go's RFC 3339 text with the fraction cut to six digits, trailing zeros trimmed, as Go trims them."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    assert match, f"not a Go timestamp: {text!r}"
    head, fraction, zone = match.groups()
    fraction = (fraction or "")[:6].rstrip("0")
    return f"{head}{'.' + fraction if fraction else ''}{zone}"


def assert_same_json(ours: Any, go: Any, path: str = "$") -> None:
    """Same keys in the same order, same JSON types, same values; times compared at microseconds."""
    if isinstance(go, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not an object"
        assert list(ours) == list(go), f"{path}: keys differ"
        for key, value in go.items():
            if key in TIME_KEYS and isinstance(value, str):
                assert ours[key] == go_time_at_microseconds(value), f"{path}.{key}"
                assert parse_time(ours[key]) == parse_time(value), f"{path}.{key}"
            else:
                assert_same_json(ours[key], value, f"{path}.{key}")
    elif isinstance(go, list):
        assert isinstance(ours, list), f"{path}: {ours!r} is not an array"
        assert len(ours) == len(go), f"{path}: lengths differ"
        for i, (a, b) in enumerate(zip(ours, go, strict=True)):
            assert_same_json(a, b, f"{path}[{i}]")
    else:
        assert type(ours) is type(go), f"{path}: {ours!r} ({type(ours).__name__}) vs {go!r} ({type(go).__name__})"
        assert ours == go, f"{path}: {ours!r} != {go!r}"


def test_time_cut_helper() -> None:
    assert go_time_at_microseconds("2026-11-22T10:13:13.283107786Z") == "2026-11-22T10:13:13.283107Z"
    assert go_time_at_microseconds("2026-11-22T10:19:11.84106413Z") == "2026-11-22T10:19:11.841064Z"
    assert go_time_at_microseconds("2026-11-22T10:19:11.000000413Z") == "2026-11-22T10:19:11Z"
    assert go_time_at_microseconds("0001-01-01T00:00:00Z") == "0001-01-01T00:00:00Z"


def test_comparison_helper_catches_differences() -> None:
    with pytest.raises(AssertionError):
        assert_same_json({"a": 1, "b": 2}, {"b": 2, "a": 1})  # order
    with pytest.raises(AssertionError):
        assert_same_json({"a": 1.0}, {"a": 1})  # JSON type
    with pytest.raises(AssertionError):
        assert_same_json({"a": True}, {"a": 1})
    with pytest.raises(AssertionError):
        assert_same_json({"ETA": "2026-11-22T10:13:13Z"}, {"ETA": "2026-11-22T10:13:13.5Z"})


# --------------------------------------------------------------------------- 1. decode and re-encode


def has_sub_microsecond_time(text: str) -> bool:
    return SUB_MICROSECOND.search(text) is not None


def check_round_trip(payload: Payload, encoded: bytes) -> None:
    assert_same_json(json.loads(encoded), payload.data)
    if payload.raw is not None and not has_sub_microsecond_time(payload.raw):
        assert encoded == payload.raw.encode("utf-8"), "same bytes as Go"


@pytest.mark.parametrize("payload", of_kind("signature"))
def test_go_message_round_trip(payload: Payload) -> None:
    source = payload.raw.encode("utf-8") if payload.raw is not None else json.dumps(payload.data).encode()
    signature = Signature.decode(source)
    assert signature.uuid == payload.data["UUID"] and signature.name == payload.data["Name"]
    check_round_trip(payload, signature.encode())


@pytest.mark.parametrize("payload", of_kind("state"))
def test_go_state_round_trip(payload: Payload) -> None:
    source = payload.raw if payload.raw is not None else json.dumps(payload.data)
    state = TaskState.decode(source)
    assert (state.task_uuid, state.state, state.error) == (
        payload.data["TaskUUID"],
        payload.data["State"],
        payload.data["Error"],
    )
    check_round_trip(payload, state.encode())


@pytest.mark.parametrize("payload", of_kind("group"))
def test_go_group_meta_round_trip(payload: Payload) -> None:
    assert payload.raw is not None
    meta = GroupMeta.decode(payload.raw)
    assert meta.task_uuids == payload.data["TaskUUIDs"]
    assert meta.chord_triggered is payload.data["ChordTriggered"]
    check_round_trip(payload, meta.encode())


def test_byte_identical_for_most_captures() -> None:
    # Guard against the byte check silently never applying.
    exact = [p for p in PAYLOADS if p.raw is not None and not has_sub_microsecond_time(p.raw)]
    assert len(exact) >= 40


def test_go_message_details() -> None:
    types_task = Signature.decode((INTEROP_DIR / "redis_types_task.json").read_bytes())
    assert types_task.args == [
        Arg("bool", True),
        Arg("int", -7),
        Arg("uint64", 18446744073709551615),
        Arg("float64", 3.25),
        Arg("string", "héllo"),
        Arg("[]byte", "aGk="),
    ]
    chain = Signature.decode((INTEROP_DIR / "redis_chain.json").read_bytes())
    assert chain.headers == {}
    assert chain.on_success is not None and chain.on_success[0].headers is None  # nested steps keep null
    assert chain.on_success[0].on_success is not None and chain.on_success[0].on_success[0].name == "multiply"
    chord_member = Signature.decode((INTEROP_DIR / "redis_chord_tasks.jsonl").read_text().splitlines()[0])
    assert chord_member.chord_callback is not None and chord_member.chord_callback.args is None
    assert chord_member.group_task_count == 3 and chord_member.group_uuid.startswith("group_")


def test_go_eta_score_is_our_score_at_microseconds() -> None:
    zadd = capture("redis_task_eta_zadd.json")
    eta = Signature.from_wire(zadd["member"]).eta
    assert eta is not None
    assert unix_ns(eta) == int(zadd["score_as_sent"]) // 1000 * 1000


def test_amqp_redelivered_retry_body_decodes_despite_x_death() -> None:
    envelope = capture("amqp_retry_deadlettered_envelope.json")
    signature = Signature.decode(envelope["body"])
    assert (signature.retry_count, signature.retry_timeout) == (1, 1)
    assert signature.eta is not None


# --------------------------------------------------------------------------- 2. results decode to Python values

EXPECTED_RESULTS: dict[str, list[Any]] = {
    "backend_state_success.json": [2],
    "backend_state_success_types.json": [(True, -7, 2**64 - 1, 3.25, "héllo", b"hi")],
    "backend_state_success_slices.jsonl": [3, 4.2, "foobar", ["f", "o", "o"], (7, "3-4")],
    "amqp_backend_states_add.jsonl": [2],
    "amqp_backend_states_chord_callback.jsonl": [88],
}


@pytest.mark.parametrize(("file", "expected"), EXPECTED_RESULTS.items())
def test_go_results_decode_to_python_values(file: str, expected: list[Any]) -> None:
    payloads = capture_lines(file) if file.endswith(".jsonl") else [capture(file)]
    successes = [TaskState.decode(json.dumps(p)) for p in payloads if p["State"] == SUCCESS]
    values = [decode_results(s.results) for s in successes]
    assert values == expected
    for value, want in zip(values, expected, strict=True):
        assert type(value) is type(want)


def test_every_go_state_decodes_its_results() -> None:
    for payload in PAYLOADS:
        if payload.kind == "state":
            state = TaskState.decode(json.dumps(payload.data))
            value = decode_results(state.results)
            assert (value is None) == (payload.data["Results"] is None), payload.id


def test_go_non_success_states() -> None:
    assert TaskState.decode(json.dumps(capture("backend_state_failure_panic.json"))).error == "oops"
    pending = TaskState.decode(json.dumps(capture("backend_state_pending.json")))
    assert pending.state == PENDING and pending.task_name == "add" and pending.created_at is not None
    amqp_received = TaskState.decode(json.dumps(capture_lines("amqp_backend_states_add.jsonl")[1]))
    assert amqp_received.task_name == "" and amqp_received.created_at is None  # AMQP backend does not merge
    assert amqp_received.encode().endswith(b'"CreatedAt":"0001-01-01T00:00:00Z","TTL":0}')


def test_group_meta_members_in_group_order() -> None:
    meta = GroupMeta.decode(json.dumps(capture("groupmeta.json")))
    members = [json.loads(line)["UUID"] for line in (INTEROP_DIR / "redis_chord_tasks.jsonl").read_text().splitlines()]
    assert sorted(meta.task_uuids) == sorted(members)
    assert GroupMeta.decode(json.dumps(capture("groupmeta_chord_triggered.json"))).chord_triggered is True


# --------------------------------------------------------------------------- our worker with Go's tasks


def register_go_tasks(server: Server) -> None:
    """Python twins of the Go tasks the captures were made with (tests/interop/captures/README.md)."""
    later_calls: list[int] = []

    def add(*args: int) -> int:
        return sum(args)

    def multiply(*args: int) -> int:
        product = 1
        for value in args:
            product *= value
        return product

    def panic_task() -> None:
        raise RuntimeError("oops")

    def error_task(text: str) -> None:
        raise RuntimeError(text)

    def sum_ints(xs: list[int]) -> int:
        return sum(xs)

    def sum_floats(xs: list[float]) -> float:
        return sum(xs)

    def concat(xs: list[str]) -> str:
        return "".join(xs)

    def split(text: str) -> list[str]:
        return list(text)

    def types(b: bool, i: int, u: int, f: float, s: str, data: bytes) -> tuple[Any, ...]:
        return b, Arg("int", i), Arg("uint64", u), f, s, data  # echoes with Go's result types

    def multi(a: int, b: int) -> tuple[int, str]:
        return a + b, f"{a}-{b}"

    def retry_later() -> str:
        later_calls.append(1)
        if len(later_calls) == 1:
            raise RetryTaskLater("later", 2)
        return "retried ok"

    def on_error(text: str) -> None:
        return None

    server.register_tasks(
        {
            "add": add,
            "multiply": multiply,
            "panic_task": panic_task,
            "error_task": error_task,
            "sum_ints": sum_ints,
            "sum_floats": sum_floats,
            "concat": concat,
            "split": split,
            "types": types,
            "multi": multi,
            "retry_later": retry_later,
            "on_error": on_error,
        }
    )


@pytest.fixture
def go_server(tmp_path: Path) -> Iterator[Server]:
    """A server on its own memory:// store, using Go's default queue name like the captures do."""
    config = config_for("memory", tmp_path, unique("interop"))
    config = Config(broker=config.broker, default_queue="machinery_tasks", redis=config.redis)
    server = Server(config)
    register_go_tasks(server)
    yield server
    server.close()


def record_pushes(server: Server) -> list[bytes]:
    """Every message body our broker queues (ready or delayed), exactly as queued."""
    pushed: list[bytes] = []
    push, push_delayed = server.broker._push, server.broker._push_delayed

    async def recording_push(messages: Any) -> None:
        pushed.extend(body for _, body in messages)
        await push(messages)

    async def recording_push_delayed(messages: Any) -> None:
        pushed.extend(body for _, body in messages)
        await push_delayed(messages)

    server.broker._push = recording_push  # type: ignore[method-assign]
    server.broker._push_delayed = recording_push_delayed  # type: ignore[method-assign]
    return pushed


def release_retries_at_once(server: Server) -> list[dict[str, Any]]:
    """Record each publish's wire form, then drop its ETA so that retries run now, not in 1-2 s."""
    published: list[dict[str, Any]] = []

    def handler(signature: Signature) -> None:
        published.append(json.loads(signature.encode()))
        signature.eta = None

    server.set_pre_publish_handler(handler)
    return published


def wait_for_state(server: Server, task_uuid: str) -> TaskState:
    with contextlib.suppress(TaskFailed):
        server.result(task_uuid).get(timeout=WAIT)
    return server.result(task_uuid).state()


def final_go_states() -> dict[str, dict[str, Any]]:
    """UUID -> the last SUCCESS/FAILURE state Go stored for it, over every backend capture."""
    final: dict[str, dict[str, Any]] = {}
    for payload in PAYLOADS:
        if payload.kind == "state" and payload.data["State"] in (SUCCESS, FAILURE):
            final[payload.data["TaskUUID"]] = payload.data
    return final


def go_messages_with_known_outcome() -> list[Any]:
    final = final_go_states()
    seen: set[str] = set()
    params = []
    for payload in PAYLOADS:
        uuid = payload.data.get("UUID")
        if payload.kind == "signature" and payload.raw is not None and uuid in final and uuid not in seen:
            seen.add(uuid)
            params.append(pytest.param(payload, final[uuid], id=payload.id))
    return params


KNOWN_OUTCOMES = go_messages_with_known_outcome()


def test_known_outcomes_cover_the_interesting_captures() -> None:
    names = {p.values[0].data["Name"] for p in KNOWN_OUTCOMES}  # type: ignore[union-attr]
    assert {"add", "types", "sum_floats", "split", "multi", "error_task", "panic_task", "multiply"} <= names


@pytest.mark.parametrize(("payload", "go_state"), KNOWN_OUTCOMES)
def test_our_worker_ends_like_the_go_worker(go_server: Server, payload: Payload, go_state: dict[str, Any]) -> None:
    assert payload.raw is not None
    release_retries_at_once(go_server)
    # AMQP captures carry the binding key as RoutingKey; a retry goes back there, so consume that queue.
    queue = payload.data["RoutingKey"]
    with running_worker(go_server, queue=queue):
        push_raw(go_server, payload.raw.encode("utf-8"), queue=queue)
        ours = wait_for_state(go_server, go_state["TaskUUID"])
    wire = json.loads(ours.encode())
    for key in ("TaskUUID", "State", "Results", "Error"):
        assert_same_json(wire[key], go_state[key], key)


def test_our_chain_steps_are_published_like_gos(go_server: Server) -> None:
    pushed = record_pushes(go_server)
    steps = (INTEROP_DIR / "redis_chain_steps_published.jsonl").read_text().splitlines()
    last_uuid = json.loads(steps[2])["UUID"]
    with running_worker(go_server):
        push_raw(go_server, steps[0].encode())
        assert go_server.result(last_uuid).get(timeout=WAIT) == 48  # 1+1=2, then 5+5+2=12, then 4*12
    assert pushed[0] == steps[0].encode()  # our own push of Go's first message
    assert pushed[1:] == [steps[1].encode(), steps[2].encode()]  # byte for byte what the Go worker pushed


def test_immutable_chain_step_is_published_like_gos(go_server: Server) -> None:
    # The step's own Immutable flag is not what Go checks: the result 2 is still appended (docs/wire.md §6.3).
    pushed = record_pushes(go_server)
    first = (INTEROP_DIR / "redis_immutable_chain.json").read_bytes().rstrip(b"\n")
    step2 = (INTEROP_DIR / "redis_immutable_chain_step2_published_by_worker.json").read_bytes().rstrip(b"\n")
    with running_worker(go_server):
        push_raw(go_server, first)
        assert go_server.result(json.loads(step2)["UUID"]).get(timeout=WAIT) == 12
    assert pushed[1:] == [step2]


def test_on_error_callback_is_published_like_gos(go_server: Server) -> None:
    pushed = record_pushes(go_server)
    task = (INTEROP_DIR / "redis_error_task_with_onerror.json").read_bytes().rstrip(b"\n")
    go_callback = capture("redis_onerror_callback_published_by_worker.json")
    with running_worker(go_server):
        push_raw(go_server, task)
        wait_for_state(go_server, json.loads(task)["UUID"])
        wait_until(lambda: len(pushed) >= 2, what="the OnError callback published")
        ours = json.loads(pushed[1])
        assert go_server.result(ours["UUID"]).get(timeout=WAIT) is None
    # The callback had no UUID; each worker makes a fresh one.
    assert ours["UUID"].startswith("task_") and ours["UUID"] != go_callback["UUID"]
    assert_same_json({**ours, "UUID": go_callback["UUID"]}, go_callback)


def test_retries_are_republished_like_gos(go_server: Server) -> None:
    published = release_retries_at_once(go_server)
    task = (INTEROP_DIR / "redis_retry_task.json").read_bytes().rstrip(b"\n")
    go_republished = capture_lines("redis_retry_republished_zadd_members.jsonl")
    with running_worker(go_server):
        push_raw(go_server, task)
        assert wait_for_state(go_server, json.loads(task)["UUID"]).error == "retry me"
    assert len(published) == 2
    for ours, go in zip(published, go_republished, strict=True):
        # The ETA is "now + RetryTimeout": its value differs run to run, its form must not.
        assert isinstance(ours["ETA"], str) and parse_time(ours["ETA"]) is not None
        assert ours["ETA"].endswith("Z")
        assert_same_json({**ours, "ETA": ANY_TIME}, {**go, "ETA": ANY_TIME})


def test_retry_later_is_republished_like_gos(go_server: Server) -> None:
    published = release_retries_at_once(go_server)
    member = (INTEROP_DIR / "redis_retry_later_republished_zadd_member.json").read_bytes().rstrip(b"\n")
    go = json.loads(member)
    with running_worker(go_server):
        push_raw(go_server, member)
        assert go_server.result(go["UUID"]).get(timeout=WAIT) == "retried ok"
    assert len(published) == 1
    ours = published[0]
    assert isinstance(ours["ETA"], str) and parse_time(ours["ETA"]) is not None
    assert_same_json({**ours, "ETA": ANY_TIME}, {**go, "ETA": ANY_TIME})


def test_chord_callback_is_published_like_gos(go_server: Server) -> None:
    pushed = record_pushes(go_server)
    meta = GroupMeta.decode((INTEROP_DIR / "groupmeta.json").read_bytes())
    run_sync(go_server.backend.write_group_meta(meta))
    members = (INTEROP_DIR / "redis_chord_tasks.jsonl").read_text().splitlines()
    callback = (INTEROP_DIR / "redis_chord_callback_published_by_worker.json").read_bytes().rstrip(b"\n")
    with running_worker(go_server):
        push_raw(go_server, *(m.encode() for m in members))
        assert go_server.result(json.loads(callback)["UUID"]).get(timeout=WAIT) == 88
    assert pushed[len(members) :] == [callback]  # members' results in group order: 2, 4, 11


# --------------------------------------------------------------------------- 4. Go's edge cases on our worker


@dataclass
class Expect:
    """What our worker does with one edge case."""

    state: str | None = None  # final state, or None when no state is written
    results: str = "go"  # "go": exactly Go's stored Results
    error: str = ""  # a fragment our stored Error must contain
    dead_letter: str = ""  # a fragment of the dead letter's reason
    requeued: bool = False  # stays in the queue (no worker has the task)
    differs_from_go: str = ""  # why, where we deliberately do something else


EXPECTED: dict[str, Expect] = {
    "eta_naive": Expect(
        dead_letter="has no time zone",
        differs_from_go="Go cannot decode it and loses the message; we keep it as a dead letter with the reason",
    ),
    # Pushed straight onto the ready queue, so it runs now (the broker only delays at publish time), as in Go.
    "eta_future_offset": Expect(SUCCESS),
    "bad_type": Expect(
        FAILURE,
        error="Reflect task args error: argument 0: decimal is not one of supported types",
        differs_from_go="our error also names the argument position",
    ),
    "float_as_int": Expect(SUCCESS),
    "null_slice": Expect(SUCCESS),
    "bytes_list": Expect(SUCCESS),
    "wrong_arity": Expect(
        FAILURE,
        error="concat takes 1 argument, got 0",
        differs_from_go="Go's text is reflect's 'Call with too few input arguments'",
    ),
    "lowercase_keys": Expect(SUCCESS),
    "extra_field": Expect(SUCCESS),
    "headers_nested": Expect(SUCCESS),  # non-string header values are kept as JSON text
    "not_registered": Expect(
        requeued=True,
        differs_from_go="Go's v2 worker had lost it by shutdown; ours requeues it and still holds it after stop",
    ),
    "no_uuid": Expect(SUCCESS),  # stored under the empty key, as Go did (keys_after [""]; its value not captured)
    "big_int64": Expect(SUCCESS),  # 9007199254740993 > 2**53 stays exact
    "uint_neg": Expect(
        FAILURE,
        error="-1 is out of range for uint64",
        differs_from_go="Go's text is strconv.ParseUint's; both fail before STARTED",
    ),
    "int8_overflow": Expect(
        FAILURE,
        error="300 is out of range for int8",
        differs_from_go="Go fails at the call (int8 is not int64); we fail converting 300 to int8",
    ),
}

EDGE_CASES = {case["case"]: case for case in capture(EDGE_CASES_FILE)}


def test_every_edge_case_has_an_expectation() -> None:
    assert set(EDGE_CASES) == set(EXPECTED)


def requeue_counter(server: Server, body: bytes) -> threading.Event:
    """An event set once our worker has put ``body`` back on the queue at least twice."""
    seen = threading.Event()
    count = [0]
    push = server.broker._push

    async def counting(messages: Any) -> None:
        count[0] += sum(1 for _, b in messages if b == body)
        if count[0] >= 3:  # our own push, then two requeues
            seen.set()
        await push(messages)

    server.broker._push = counting  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_go_edge_case_on_our_worker(go_server: Server, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case, expect = EDGE_CASES[name], EXPECTED[name]
    body = case["message_pushed_to_queue"].encode()
    task_uuid = json.loads(body).get("UUID", json.loads(body).get("uuid", ""))
    go_state = json.loads(case["state_after"]) if case["state_after"] else None
    if expect.requeued:
        # Our requeue is a consumer operation, not a publish: count it there.
        requeues = count_requeues(go_server, monkeypatch)

    with running_worker(go_server):
        push_raw(go_server, body)
        if expect.dead_letter:
            wait_until(lambda: go_server.dead_letters(), what="dead-lettering")
        elif expect.requeued:
            wait_until(lambda: len(requeues) >= 2, what="requeueing")
        else:
            wait_for_state(go_server, task_uuid)
        # Never stuck: the same worker still runs a good task afterwards.
        assert go_server.send_task(Signature("add", [20, 22])).get(timeout=WAIT) == 42

    ours = run_sync(go_server.backend.get_state(task_uuid))
    letters = go_server.dead_letters()
    pending = [*go_server.get_pending_tasks(), *go_server.get_delayed_tasks()]
    if expect.dead_letter:
        assert ours is None
        assert len(letters) == 1 and letters[0].body == body
        assert expect.dead_letter in letters[0].reason
    else:
        assert letters == []
    if expect.requeued:
        assert ours is None
        assert [s.name for s in pending] == [json.loads(body)["Name"]]
    else:
        assert pending == []
    if expect.state is None:
        return
    assert ours is not None and ours.state == expect.state
    wire = json.loads(ours.encode())
    assert wire["TaskUUID"] == task_uuid
    if expect.state == SUCCESS:
        assert wire["Error"] == ""
    else:
        assert expect.error in wire["Error"]
        assert wire["Results"] is None
    if go_state is None:
        assert case["keys_after"] == [task_uuid]  # Go wrote a state under that key; only its value is missing
        return
    assert go_state["State"] == expect.state  # same outcome as Go
    if expect.state == SUCCESS:
        assert_same_json(wire["Results"], go_state["Results"], "Results")  # the very same results as Go
    elif not expect.differs_from_go:
        assert wire["Error"] == go_state["Error"]


def test_all_edge_cases_through_one_worker(go_server: Server) -> None:
    # A Go v2 worker wedges after the first bad message (docs/wire.md §9.5); ours takes them all in turn.
    bodies = [EDGE_CASES[name]["message_pushed_to_queue"].encode() for name in sorted(EDGE_CASES)]
    with running_worker(go_server):
        push_raw(go_server, *bodies)
        for name in sorted(EXPECTED):
            expect = EXPECTED[name]
            if expect.state is not None:
                body = json.loads(EDGE_CASES[name]["message_pushed_to_queue"])
                assert wait_for_state(go_server, body.get("UUID", body.get("uuid", ""))).state == expect.state, name
        wait_until(lambda: len(go_server.dead_letters()) == 1, what="the one dead letter")
        assert go_server.send_task(Signature("add", [1, 2])).get(timeout=WAIT) == 3
    assert [s.name for s in [*go_server.get_pending_tasks(), *go_server.get_delayed_tasks()]] == ["nope"]
