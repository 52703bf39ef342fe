"""Config: defaults, Go's environment names and YAML keys (docs/wire.md §13), validation, and live reload."""

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import machinery.config
from machinery import AMQPConfig, Config, ConfigError, RedisConfig, Server, Signature
from machinery.config import DEFAULT_URL
from support.fixtures import unique
from support.waiting import wait_until
from support.workers import running_worker

# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = Config()
    assert config.broker == DEFAULT_URL == "sqlite:///machinery.db"
    assert config.result_backend_url == config.broker  # one URL configures everything
    assert config.lock_url == config.broker
    assert config.default_queue == "machinery_tasks"
    assert config.results_expire_in == 3600
    assert config.results_ttl == 3600
    assert config.no_unix_signals is False
    assert config.multiple_broker_separator == ""
    assert config.broker_urls() == [DEFAULT_URL]


def test_section_defaults_are_gos() -> None:
    redis = RedisConfig()
    assert (redis.max_idle, redis.max_active, redis.idle_timeout, redis.wait) == (3, 0, 240, False)
    assert (redis.read_timeout, redis.write_timeout, redis.connect_timeout) == (15, 15, 15)
    assert (redis.normal_tasks_poll_period, redis.delayed_tasks_poll_period) == (1000, 500)
    assert redis.delayed_tasks_key == "delayed_tasks"
    amqp = AMQPConfig()
    assert (amqp.exchange, amqp.exchange_type, amqp.binding_key) == ("machinery_exchange", "direct", "machinery_task")
    assert (amqp.auto_delete, amqp.delayed_queue) == (False, "")
    assert amqp.prefetch_count == 0  # not Go's 3: a worker takes as many messages as it can run
    assert amqp.queue_declare_args == {} and amqp.queue_binding_args == {}


def test_mutable_defaults_are_not_shared() -> None:
    a, b = AMQPConfig(), AMQPConfig()
    a.queue_declare_args["x"] = 1
    assert b.queue_declare_args == {}


def test_zero_expiry_means_gos_default() -> None:
    assert Config(results_expire_in=0).results_ttl == 3600
    assert Config(results_expire_in=5).results_ttl == 5


def test_result_backend_and_lock_fall_back() -> None:
    config = Config(broker="memory://a", result_backend="memory://b")
    assert config.result_backend_url == "memory://b"
    assert config.lock_url == "memory://b"
    assert Config(broker="memory://a", lock="memory://c").lock_url == "memory://c"


def test_multiple_brokers() -> None:
    config = Config(broker="memory://a; memory://b", multiple_broker_separator=";")
    assert config.broker_urls() == ["memory://a", "memory://b"]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"broker": "foo://x"}, ["broker", "'foo://x'", "'foo'", "redis://", "memory://", "sqlite://"]),
        ({"broker": "localhost:6379"}, ["broker", "'localhost:6379'", "supported schemes"]),
        ({"broker": "memory://a", "result_backend": "bar://y"}, ["result_backend", "'bar://y'", "redis://"]),
        ({"results_expire_in": -1}, ["results_expire_in", "-1"]),
        ({"default_queue": ""}, ["default_queue"]),
        ({"heartbeat_timeout": 0}, ["heartbeat_timeout", "0"]),
        ({"redis": RedisConfig(normal_tasks_poll_period=-5)}, ["redis.normal_tasks_poll_period", "-5"]),
        ({"amqp": AMQPConfig(prefetch_count=-1)}, ["amqp.prefetch_count", "-1"]),
    ],
)
def test_config_error_names_field_and_value(kwargs: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(info.value)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Config(broker="nope://")


def test_unknown_lock_scheme_falls_back_like_go() -> None:
    # Go uses the in-process lock for any lock URL it cannot use.
    assert Config(broker="memory://a", lock="etcd://x").lock == "etcd://x"


# --------------------------------------------------------------------------- environment (Go's names)


def test_from_env_reads_gos_names() -> None:
    config = Config.from_env(
        {
            "BROKER": "memory://env",
            "DEFAULT_QUEUE": "env_q",
            "RESULT_BACKEND": "memory://env_results",
            "LOCK": "memory://env_lock",
            "RESULTS_EXPIRE_IN": "120",
            "NO_UNIX_SIGNALS": "true",
            "REDIS_MAX_IDLE": "7",
            "REDIS_MAX_ACTIVE": "11",
            "REDIS_IDLE_TIMEOUT": "60",
            "REDIS_WAIT": "1",
            "REDIS_READ_TIMEOUT": "4",
            "REDIS_NORMAL_TASKS_POLL_PERIOD": "250",
            "REDIS_DELAYED_TASKS_POLL_PERIOD": "125",
            "REDIS_DELAYED_TASKS_KEY": "env_delayed",
            "REDIS_CLIENT_NAME": "me",
            "REDIS_CLUSTER_ENABLED": "false",
            "AMQP_EXCHANGE": "env_ex",
            "AMQP_EXCHANGE_TYPE": "topic",
            "AMQP_BINDING_KEY": "env_key",
            "AMQP_PREFETCH_COUNT": "9",
            "AMQP_AUTO_DELETE": "true",
            "AMQP_DELAYED_QUEUE": "env_delay",
            "AMQP_QUEUE_BINDING_ARGS": "a:b,c:d",
            "SQS_WAIT_TIME_SECONDS": "20",
            "SQS_VISIBILITY_TIMEOUT": "30",
            "TASK_STATES_TABLE": "ts",
            "UNRELATED": "ignored",
        }
    )
    assert (config.broker, config.default_queue, config.result_backend, config.lock) == (
        "memory://env",
        "env_q",
        "memory://env_results",
        "memory://env_lock",
    )
    assert config.results_expire_in == 120 and config.no_unix_signals is True
    r = config.redis
    assert (r.max_idle, r.max_active, r.idle_timeout, r.wait, r.read_timeout) == (7, 11, 60, True, 4)
    assert (r.normal_tasks_poll_period, r.delayed_tasks_poll_period) == (250, 125)
    assert (r.delayed_tasks_key, r.client_name, r.cluster_enabled) == ("env_delayed", "me", False)
    a = config.amqp
    assert (a.exchange, a.exchange_type, a.binding_key, a.prefetch_count) == ("env_ex", "topic", "env_key", 9)
    assert (a.auto_delete, a.delayed_queue) == (True, "env_delay")
    assert a.queue_binding_args == {"a": "b", "c": "d"}
    assert (config.sqs.wait_time_seconds, config.sqs.visibility_timeout) == (20, 30)
    assert config.dynamodb.task_states_table == "ts"


def test_from_env_keeps_queue_declare_arg_values() -> None:
    # Go's envconfig turns this into {"x-max-priority": null} (value lost); we keep the integer.
    config = Config.from_env({"BROKER": "memory://x", "AMQP_QUEUE_DECLARE_ARGS": "x-max-priority:10"})
    assert config.amqp.queue_declare_args == {"x-max-priority": 10}


def test_from_env_accepts_gos_misspelled_separator() -> None:
    env = {"BROKER": "memory://a|memory://b", "MULTIPLE_BROKEN_SEPARATOR": "|"}
    config = Config.from_env(env)
    assert config.multiple_broker_separator == "|"
    assert config.broker_urls() == ["memory://a", "memory://b"]
    assert Config.from_env(
        {**env, "MULTIPLE_BROKEN_SEPARATOR": "", "MULTIPLE_BROKER_SEPARATOR": "|"}
    ).broker_urls() == ["memory://a", "memory://b"]


def test_from_env_without_variables_gives_defaults() -> None:
    assert Config.from_env({}) == Config()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER", "memory://from_os")
    monkeypatch.setenv("DEFAULT_QUEUE", "os_q")
    config = Config.from_env()
    assert (config.broker, config.default_queue) == ("memory://from_os", "os_q")


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"RESULTS_EXPIRE_IN": "soon"}, ["results_expire_in", "$RESULTS_EXPIRE_IN", "'soon'"]),
        ({"RESULTS_EXPIRE_IN": "-5"}, ["results_expire_in", "-5"]),
        ({"REDIS_WAIT": "maybe"}, ["redis.wait", "$REDIS_WAIT", "'maybe'"]),
        ({"AMQP_PREFETCH_COUNT": "3.5"}, ["amqp.prefetch_count", "'3.5'"]),
        ({"AMQP_QUEUE_DECLARE_ARGS": "novalue"}, ["amqp.queue_declare_args", "'novalue'"]),
        ({"BROKER": "kafka://x"}, ["broker", "'kafka://x'", "supported schemes"]),
    ],
)
def test_from_env_errors_name_variable_and_value(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"BROKER": "memory://x", **env})
    for fragment in fragments:
        assert fragment in str(info.value)


# --------------------------------------------------------------------------- YAML (Go's keys)

GO_YAML = """\
broker: memory://yaml_broker
default_queue: yaml_q
result_backend: memory://yaml_results
results_expire_in: 120
no_unix_signals: true
multiple_broker_separator: ","
redis:
  max_idle: 9
  max_active: 20
  max_idle_timeout: 100
  wait: true
  read_timeout: 3
  write_timeout: 4
  connect_timeout: 5
  normal_tasks_poll_period: 300
  delayed_tasks_poll_period: 150
  delayed_tasks_key: yaml_delayed
  client_name: yaml_client
  master_name: mymaster
  cluster_enabled: false
  sentinel_password: sp
amqp:
  exchange: yaml_exchange
  exchange_type: fanout
  binding_key: yaml_key
  prefetch_count: 7
  auto_delete: true
  delayed_queue: yaml_delay
  queue_declare_args:
    x-max-priority: 10
  queue_binding_args:
    x-match: any
sqs:
  receive_wait_time_seconds: 20
  receive_visibility_timeout: 30
  visibility_hearth_beat: true
dynamodb:
  task_states_table: yaml_states
  group_metas_table: yaml_groups
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_from_yaml_reads_gos_keys(tmp_path: Path) -> None:
    config = Config.from_yaml(write(tmp_path / "config.yml", GO_YAML))
    assert (config.broker, config.default_queue, config.result_backend) == (
        "memory://yaml_broker",
        "yaml_q",
        "memory://yaml_results",
    )
    assert (config.results_expire_in, config.no_unix_signals, config.multiple_broker_separator) == (120, True, ",")
    r = config.redis
    assert (r.max_idle, r.max_active, r.idle_timeout, r.wait) == (9, 20, 100, True)
    assert (r.read_timeout, r.write_timeout, r.connect_timeout) == (3, 4, 5)
    assert (r.normal_tasks_poll_period, r.delayed_tasks_poll_period, r.delayed_tasks_key) == (300, 150, "yaml_delayed")
    assert (r.client_name, r.master_name, r.cluster_enabled, r.sentinel_password) == (
        "yaml_client",
        "mymaster",
        False,
        "sp",
    )
    a = config.amqp
    assert (a.exchange, a.exchange_type, a.binding_key, a.prefetch_count) == ("yaml_exchange", "fanout", "yaml_key", 7)
    assert (a.auto_delete, a.delayed_queue) == (True, "yaml_delay")
    assert a.queue_declare_args == {"x-max-priority": 10}
    assert a.queue_binding_args == {"x-match": "any"}
    s = config.sqs
    assert (s.wait_time_seconds, s.visibility_timeout, s.visibility_heartbeat) == (20, 30, True)
    assert (config.dynamodb.task_states_table, config.dynamodb.group_metas_table) == ("yaml_states", "yaml_groups")


def test_from_yaml_partial_sections_keep_other_defaults(tmp_path: Path) -> None:
    config = Config.from_yaml(write(tmp_path / "c.yml", "broker: memory://p\nredis:\n  max_idle: 1\n"))
    assert config.redis.max_idle == 1
    assert config.redis.idle_timeout == 240
    assert config.amqp == AMQPConfig()


def test_from_yaml_reads_the_whole_file(tmp_path: Path) -> None:
    # Go reads only the first 1000 bytes; a key past that point must still count here.
    padding = "".join(f"# comment line {i:04d} padding padding padding padding\n" for i in range(40))
    text = "broker: memory://long\n" + padding + "default_queue: beyond_1000_bytes\n"
    path = write(tmp_path / "long.yml", text)
    assert text.index("default_queue") > 1000
    assert Config.from_yaml(path).default_queue == "beyond_1000_bytes"


def test_from_yaml_empty_file_is_defaults(tmp_path: Path) -> None:
    assert Config.from_yaml(write(tmp_path / "empty.yml", "")) == Config()


def test_from_yaml_unknown_key_is_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = Config.from_yaml(write(tmp_path / "c.yml", "broker: memory://u\nfuture_key: 1\nredis:\n  newer: 2\n"))
    assert config.broker == "memory://u"
    assert "future_key" in caplog.text
    assert "redis.newer" in caplog.text


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('results_expire_in: "soon"\n', ["results_expire_in", "'soon'"]),
        ("results_expire_in: 1.5\n", ["results_expire_in", "1.5"]),
        ("results_expire_in: -3\n", ["results_expire_in", "-3"]),
        ("no_unix_signals: 'yes'\n", ["no_unix_signals", "'yes'"]),
        ("redis: 5\n", ["redis", "5"]),
        ("redis:\n  max_idle: lots\n", ["redis.max_idle", "'lots'"]),
        ("amqp:\n  queue_declare_args: [1, 2]\n", ["amqp.queue_declare_args", "[1, 2]"]),
        ("broker: zzz://a\n", ["broker", "'zzz://a'", "supported schemes", "memory://"]),
        ("broker: [1]\n", ["broker", "[1]"]),
        ("- a\n- b\n", ["mapping"]),
        ("broker: memory://x\n  bad: indentation\n", ["not valid YAML"]),
    ],
)
def test_from_yaml_errors_name_key_and_value(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(write(tmp_path / "bad.yml", text))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_from_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "missing.yml")


# --------------------------------------------------------------------------- reload


def rewrite(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime forward, so coarse file-system clocks cannot hide the change."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machinery.config, "RELOAD_INTERVAL", 0.05)


@contextmanager
def reloading(path: Path) -> Iterator[Config]:
    """``Config.from_yaml(path, reload=True)``, its reloading stopped when the block ends."""
    config = Config.from_yaml(path, reload=True)
    try:
        yield config
    finally:
        config.stop_reloading()


@pytest.mark.usefixtures("fast_reload")
def test_reload_picks_up_a_change(tmp_path: Path) -> None:
    path = write(tmp_path / "reload.yml", "broker: memory://reload\nresults_expire_in: 100\nredis:\n  max_idle: 1\n")
    with reloading(path) as config:
        assert config.results_expire_in == 100
        rewrite(path, "broker: memory://reload\nresults_expire_in: 200\nredis:\n  max_idle: 2\n")
        assert wait_until(lambda: config.results_expire_in == 200, what="the change being picked up")
        assert config.redis.max_idle == 2


@pytest.mark.usefixtures("fast_reload")
def test_reload_keeps_old_values_on_a_bad_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "reload.yml", "broker: memory://reload_bad\nresults_expire_in: 100\n")
    with reloading(path) as config:
        rewrite(path, "broker: memory://reload_bad\nresults_expire_in: soon\n")
        assert wait_until(lambda: "reload" in caplog.text and "failed" in caplog.text, what="the failed reload logged")
        assert config.results_expire_in == 100
        rewrite(path, "broker: memory://reload_bad\nresults_expire_in: 300\n")
        assert wait_until(lambda: config.results_expire_in == 300, what="the fixed file being picked up")


@pytest.mark.usefixtures("fast_reload")
def test_reload_does_not_switch_broker_under_a_running_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "reload.yml", "broker: memory://reload_keep\nresults_expire_in: 100\n")
    with reloading(path) as config:
        rewrite(path, "broker: memory://elsewhere\nresults_expire_in: 150\n")
        assert wait_until(lambda: config.results_expire_in == 150, what="the change being picked up")
        assert config.broker == "memory://reload_keep"
        assert "broker changed; restart to apply it" in caplog.text


@pytest.mark.usefixtures("fast_reload")
def test_reload_reaches_a_running_worker_and_backend(tmp_path: Path) -> None:
    queue = unique("reload_q")
    path = write(tmp_path / "reload.yml", f"broker: memory://{queue}\ndefault_queue: {queue}\nresults_expire_in: 100\n")
    with reloading(path) as config:
        server = Server(config)
        seen_ttls: list[int] = []
        release = threading.Event()

        def probe() -> int:
            release.wait(10)
            seen_ttls.append(server.backend.ttl)
            return server.backend.ttl

        server.register_task("probe", probe)
        with running_worker(server, concurrency=1) as worker:
            assert worker.server.config is config
            assert server.backend.ttl == 100
            result = server.send_task(Signature("probe"))
            rewrite(path, f"broker: memory://{queue}\ndefault_queue: {queue}\nresults_expire_in: 250\n")
            assert wait_until(lambda: server.backend.ttl == 250, what="the backend seeing the new expiry")
            release.set()
            assert result.get(timeout=10) == 250
        assert seen_ttls == [250]
