"""The public surface: ``machinery.__all__`` is pinned, so any change to it is deliberate."""

import importlib

import pytest

import machinery

PUBLIC_NAMES = [
    "AMQPConfig",
    "Arg",
    "ArgumentError",
    "AsyncResult",
    "BrokerConnectionError",
    "Chain",
    "ChainAsyncResult",
    "Chord",
    "ChordAsyncResult",
    "Config",
    "ConfigError",
    "DynamoDBConfig",
    "FAILURE",
    "GCPPubSubConfig",
    "Group",
    "GroupMeta",
    "MachineryError",
    "MessageDecodeError",
    "Middleware",
    "MongoDBConfig",
    "Outcome",
    "PENDING",
    "RECEIVED",
    "RETRY",
    "RedisConfig",
    "ResultConsumedError",
    "ResultTypeError",
    "ResultsDisabledError",
    "RetryTaskLater",
    "SQSConfig",
    "STARTED",
    "SUCCESS",
    "Server",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskNotFoundError",
    "TaskNotRegisteredError",
    "TaskResult",
    "TaskRevoked",
    "TaskState",
    "TimeLimitExceeded",
    "UnsupportedOperation",
    "Worker",
    "WorkerProcessDied",
    "get_logger",
    "set_logger",
]


def test_all_is_pinned_and_sorted() -> None:
    assert machinery.__all__ == PUBLIC_NAMES
    assert sorted(machinery.__all__) == machinery.__all__
    assert len(set(machinery.__all__)) == len(machinery.__all__)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_each_public_name_imports(name: str) -> None:
    module = importlib.import_module("machinery")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from machinery import {name}", namespace)
    assert namespace[name] is getattr(machinery, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from machinery import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC_NAMES)


def test_state_names_are_go_names() -> None:
    assert [
        machinery.PENDING,
        machinery.RECEIVED,
        machinery.STARTED,
        machinery.RETRY,
        machinery.SUCCESS,
        machinery.FAILURE,
    ] == ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE"]


def test_errors_share_a_base_class() -> None:
    for name in (
        "ArgumentError",
        "BrokerConnectionError",
        "ConfigError",
        "MessageDecodeError",
        "ResultTypeError",
        "TaskFailed",
        "TaskNotRegisteredError",
    ):
        assert issubclass(getattr(machinery, name), machinery.MachineryError), name


def test_version_is_a_string() -> None:
    assert isinstance(machinery.__version__, str) and machinery.__version__
