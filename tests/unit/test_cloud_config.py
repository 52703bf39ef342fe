"""The cloud drivers' settings: Go's names where Go has them, from code, the environment and
YAML; Go's URL rules; where endpoints and regions come from. No service needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from machinery import Config, ConfigError
from machinery._drivers.aws import endpoint_for, region_of

BACKEND = "redis://127.0.0.1:6379/0"


def test_from_env_reads_the_cloud_sections() -> None:
    config = Config.from_env(
        {
            "BROKER": "https://sqs.eu-west-1.amazonaws.com/123456789012",
            "RESULT_BACKEND": "https://dynamodb.eu-west-1.amazonaws.com",
            "SQS_WAIT_TIME_SECONDS": "20",
            "SQS_VISIBILITY_TIMEOUT": "60",
            "SQS_MAX_DELAY_SECONDS": "300",
            "SQS_CREATE_MISSING": "true",
            "TASK_STATES_TABLE": "states",
            "GROUP_METAS_TABLE": "groups",
            "DYNAMODB_CREATE_TABLES": "1",
            "GCPPUBSUB_ACK_DEADLINE": "30",
        }
    )
    assert (config.sqs.wait_time_seconds, config.sqs.visibility_timeout, config.sqs.max_delay_seconds) == (20, 60, 300)
    assert config.sqs.create_missing is True
    assert (config.dynamodb.task_states_table, config.dynamodb.group_metas_table) == ("states", "groups")
    assert config.dynamodb.create_tables is True and config.gcppubsub.ack_deadline == 30


def test_from_yaml_reads_the_cloud_sections(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "broker: gcppubsub://my-project/my-subscription\n"
        "default_queue: my-topic\n"
        f"result_backend: {BACKEND}\n"
        "sqs:\n  receive_wait_time_seconds: 5\n  max_delay_seconds: 60\n"
        "dynamodb:\n  create_tables: true\n  endpoint_url: http://127.0.0.1:8000\n"
        "gcppubsub:\n  create_missing: false\n  ack_deadline: 120\n"
    )
    config = Config.from_yaml(path)
    assert (config.sqs.wait_time_seconds, config.sqs.max_delay_seconds) == (5, 60)
    assert config.dynamodb.create_tables is True and config.dynamodb.endpoint_url == "http://127.0.0.1:8000"
    assert (config.gcppubsub.create_missing, config.gcppubsub.ack_deadline) == (False, 120)


def test_gos_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISABLE_STRICT_SQS_CHECK", raising=False)
    Config(
        broker="https://sqs.us-east-2.amazonaws.com/123456789012",
        result_backend="https://dynamodb.us-east-2.amazonaws.com",
    )
    Config(broker="gcppubsub://my-project/my-subscription", result_backend=BACKEND)
    with pytest.raises(ConfigError, match="starts with https://sqs"):
        Config(broker="https://example.com/queues", result_backend=BACKEND)
    with pytest.raises(ConfigError, match="starts with https://dynamodb"):
        Config(broker="memory://x", result_backend="https://example.com")
    with pytest.raises(ConfigError, match="gcppubsub://PROJECT/SUBSCRIPTION"):
        Config(broker="gcppubsub://project/", result_backend=BACKEND)
    monkeypatch.setenv("DISABLE_STRICT_SQS_CHECK", "1")
    Config(broker="http://localhost:4566/000000000000", result_backend=BACKEND)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("sqs", {"max_delay_seconds": 901}, "sqs.max_delay_seconds must be 1-900"),
        ("sqs", {"wait_time_seconds": -1}, "sqs.wait_time_seconds must be >= 0"),
        ("gcppubsub", {"ack_deadline": 5}, "gcppubsub.ack_deadline must be 10-600"),
    ],
)
def test_invalid_settings_are_named(setting: str, value: dict[str, int], message: str) -> None:
    from machinery import GCPPubSubConfig, SQSConfig

    section = {"sqs": SQSConfig, "gcppubsub": GCPPubSubConfig}[setting](**value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        Config(broker="memory://x", **{setting: section})


def test_endpoints_and_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    assert region_of("https://sqs.us-east-2.amazonaws.com/1234") == "us-east-2"
    assert region_of("http://127.0.0.1:5000/1234") == ""
    assert endpoint_for("SQS", "", "https://sqs.us-east-2.amazonaws.com/1234") is None  # the SDK's own
    assert endpoint_for("SQS", "", "http://127.0.0.1:5000/1234") == "http://127.0.0.1:5000"  # a local server
    assert endpoint_for("SQS", "http://elsewhere:1", "https://sqs.us-east-2.amazonaws.com/1") == "http://elsewhere:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:4566")
    assert endpoint_for("SQS", "", "http://127.0.0.1:5000/1234") is None  # the SDK reads its variable
