"""Configuration: the fields of Go Machinery's config, read from code, the environment or YAML.

Environment names and YAML keys are Go Machinery's (docs/wire.md §13), so one file or one set of
variables can configure Go and Python services alike. Go's loader bugs are not copied: the
whole YAML file is read, ``k:v`` argument lists keep their values, and no empty TLS config
appears from nowhere.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from . import log
from .errors import ConfigError
from .factory import check_url

DEFAULT_URL = "sqlite:///machinery.db"
"""The embedded default broker and backend: a SQLite file in the working directory."""

RELOAD_INTERVAL = 2.0


def _f(default: Any, yaml_key: str, env: str | tuple[str, ...], doc: str = "") -> Any:
    envs = (env,) if isinstance(env, str) else env
    meta = {"yaml": yaml_key, "env": envs, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RedisConfig:
    """Redis connection and polling settings (Go's ``RedisConfig``)."""

    max_idle: int = _f(3, "max_idle", "REDIS_MAX_IDLE")
    max_active: int = _f(0, "max_active", "REDIS_MAX_ACTIVE", "0 means unlimited")
    idle_timeout: int = _f(240, "max_idle_timeout", "REDIS_IDLE_TIMEOUT")
    wait: bool = _f(False, "wait", "REDIS_WAIT")
    read_timeout: int = _f(15, "read_timeout", "REDIS_READ_TIMEOUT")
    write_timeout: int = _f(15, "write_timeout", "REDIS_WRITE_TIMEOUT")
    connect_timeout: int = _f(15, "connect_timeout", "REDIS_CONNECT_TIMEOUT")
    normal_tasks_poll_period: int = _f(1000, "normal_tasks_poll_period", "REDIS_NORMAL_TASKS_POLL_PERIOD")
    delayed_tasks_poll_period: int = _f(500, "delayed_tasks_poll_period", "REDIS_DELAYED_TASKS_POLL_PERIOD")
    delayed_tasks_key: str = _f("delayed_tasks", "delayed_tasks_key", "REDIS_DELAYED_TASKS_KEY")
    client_name: str = _f("", "client_name", "REDIS_CLIENT_NAME")
    master_name: str = _f("", "master_name", "REDIS_MASTER_NAME")
    cluster_enabled: bool = _f(False, "cluster_enabled", ("REDIS_CLUSTER_ENABLED", "REDIS_CLUSTER_MODE"))
    sentinel_password: str = _f("", "sentinel_password", "REDIS_SENTINEL_PASSWORD")
    min_replicas_acked: int = _f(
        0,
        "min_replicas_acked",
        "REDIS_MIN_REPLICAS_ACKED",
        "replicas that must confirm each batch of writes (Redis WAIT) before it counts as done; "
        "0: Redis's asynchronous replication alone",
    )
    replicas_ack_timeout: int = _f(
        1000, "replicas_ack_timeout", "REDIS_REPLICAS_ACK_TIMEOUT", "ms to wait for those confirmations"
    )


@dataclass
class AMQPConfig:
    """RabbitMQ topology settings (Go's ``AMQPConfig``)."""

    exchange: str = _f("machinery_exchange", "exchange", "AMQP_EXCHANGE")
    exchange_type: str = _f("direct", "exchange_type", "AMQP_EXCHANGE_TYPE")
    queue_declare_args: dict[str, Any] = _f({}, "queue_declare_args", "AMQP_QUEUE_DECLARE_ARGS")
    queue_binding_args: dict[str, Any] = _f({}, "queue_binding_args", "AMQP_QUEUE_BINDING_ARGS")
    binding_key: str = _f("machinery_task", "binding_key", "AMQP_BINDING_KEY")
    # Go's default is 3, which holds a worker of concurrency 100 to 3 tasks at once; a config
    # that sets it (Go's files do) keeps its value.
    prefetch_count: int = _f(
        0, "prefetch_count", "AMQP_PREFETCH_COUNT", "unacked messages per worker; 0: the worker's concurrency"
    )
    auto_delete: bool = _f(False, "auto_delete", "AMQP_AUTO_DELETE")
    delayed_queue: str = _f("", "delayed_queue", "AMQP_DELAYED_QUEUE")
    skip_publisher_queue: bool = _f(
        False,
        "skip_publisher_queue",
        "AMQP_SKIP_PUBLISHER_QUEUE",
        "Python-only deployments: do not declare Go's never-consumed publisher queue named after the binding "
        "key (docs/wire.md §10.1); declare the workers' default queue instead. "
        "Keep off when Go services share RabbitMQ",
    )


@dataclass
class SQSConfig:
    """Amazon SQS settings (Go's ``SQSConfig``, plus what Go leaves to code)."""

    wait_time_seconds: int = _f(0, "receive_wait_time_seconds", "SQS_WAIT_TIME_SECONDS")
    visibility_timeout: int | None = _f(
        None,
        "receive_visibility_timeout",
        "SQS_VISIBILITY_TIMEOUT",
        "seconds a received message stays hidden; None: the queue's own setting. The worker extends it "
        "while a task runs, whatever visibility_heartbeat says",
    )
    visibility_heartbeat: bool = _f(False, "visibility_hearth_beat", "SQS_VISIBILITY_HEARTBEAT")
    max_delay_seconds: int = _f(
        900,
        "max_delay_seconds",
        "SQS_MAX_DELAY_SECONDS",
        "longest DelaySeconds one hop of an ETA uses (SQS allows 900); a later ETA is re-delayed in hops",
    )
    endpoint_url: str = _f(
        "",
        "endpoint_url",
        "SQS_ENDPOINT_URL",
        "empty: the SDK's (AWS_ENDPOINT_URL_SQS, AWS_ENDPOINT_URL), else the broker URL's host",
    )
    region: str = _f("", "region", "SQS_REGION", "empty: from the queue URL's host, else the SDK's (AWS_REGION)")
    create_missing: bool = _f(
        False, "create_missing", "SQS_CREATE_MISSING", "create queues that do not exist (Go never does)"
    )


@dataclass
class DynamoDBConfig:
    """DynamoDB result backend settings (Go's ``DynamoDBConfig``, plus what Go leaves to code)."""

    task_states_table: str = _f("task_states", "task_states_table", "TASK_STATES_TABLE")
    group_metas_table: str = _f("group_metas", "group_metas_table", "GROUP_METAS_TABLE")
    endpoint_url: str = _f(
        "",
        "endpoint_url",
        "DYNAMODB_ENDPOINT_URL",
        "empty: the SDK's (AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL), else the backend URL",
    )
    region: str = _f("", "region", "DYNAMODB_REGION", "empty: from the backend URL's host, else the SDK's")
    create_tables: bool = _f(
        False,
        "create_tables",
        "DYNAMODB_CREATE_TABLES",
        "create missing tables (on-demand billing) with TTL enabled on their TTL attribute",
    )
    poll_interval: float = _f(
        0.2, "poll_interval", "DYNAMODB_POLL_INTERVAL", "seconds between reads while waiting for a result"
    )


@dataclass
class GCPPubSubConfig:
    """Google Cloud Pub/Sub settings (Go's ``GCPPubSubConfig`` keeps only code values)."""

    create_missing: bool = _f(
        True, "create_missing", "GCPPUBSUB_CREATE_MISSING", "create missing topics and subscriptions"
    )
    ack_deadline: int = _f(
        60,
        "ack_deadline",
        "GCPPUBSUB_ACK_DEADLINE",
        "seconds a pulled message is held (10-600); the worker extends it while a task runs",
    )
    max_extension: int = _f(
        3600, "max_extension", "GCPPUBSUB_MAX_EXTENSION", "seconds a running task's message is held at most"
    )
    endpoint: str = _f("", "endpoint", "GCPPUBSUB_ENDPOINT", "empty: PUBSUB_EMULATOR_HOST, else Google's")


@dataclass
class MongoDBConfig:
    """MongoDB result backend settings (Go's ``MongoDBConfig``: its Database; the URL names
    the server, never the database, as in Go)."""

    database: str = _f("machinery", "database", "MONGODB_DATABASE")


_SECTIONS = {
    "redis": RedisConfig,
    "amqp": AMQPConfig,
    "sqs": SQSConfig,
    "dynamodb": DynamoDBConfig,
    "gcppubsub": GCPPubSubConfig,
    "mongodb": MongoDBConfig,
}


@dataclass
class Config:
    """Everything a server and its workers need to know.

    ``result_backend`` defaults to the broker URL and ``lock`` to the result backend, so one
    URL configures a whole deployment. With no URL at all, the embedded SQLite default is used.
    """

    broker: str = _f(DEFAULT_URL, "broker", "BROKER")
    lock: str = _f("", "lock", "LOCK", "empty: the result backend's URL")
    multiple_broker_separator: str = _f(
        "", "multiple_broker_separator", ("MULTIPLE_BROKER_SEPARATOR", "MULTIPLE_BROKEN_SEPARATOR")
    )
    default_queue: str = _f("machinery_tasks", "default_queue", "DEFAULT_QUEUE")
    result_backend: str = _f("", "result_backend", "RESULT_BACKEND", "empty: the broker's URL")
    results_expire_in: int = _f(3600, "results_expire_in", "RESULTS_EXPIRE_IN")
    no_unix_signals: bool = _f(False, "no_unix_signals", "NO_UNIX_SIGNALS")
    heartbeat_timeout: float = _f(
        30.0,
        "heartbeat_timeout",
        "HEARTBEAT_TIMEOUT",
        "seconds a worker may go silent before the tasks it took are given to other workers",
    )
    unknown_task_grace: float = _f(
        10.0,
        "unknown_task_grace",
        "UNKNOWN_TASK_GRACE",
        "seconds AsyncResult.get() waits for a task with no stored state at all before raising "
        "TaskNotFoundError (never sent to this backend, or expired)",
    )
    unregistered_task_timeout: float = _f(
        3600.0,
        "unregistered_task_timeout",
        "UNREGISTERED_TASK_TIMEOUT",
        "seconds a message whose task this worker does not know keeps coming back (for a worker that "
        "knows it) before it is dead-lettered as not registered on any worker that saw it; 0: never",
    )
    periodic_lock_program: str = _f(
        "",
        "periodic_lock_program",
        "PERIODIC_LOCK_PROGRAM",
        "program name in periodic lock keys; empty: basename of sys.argv[0] "
        "(set it to a Go binary's name to share ticks with it)",
    )
    redis: RedisConfig = field(default_factory=RedisConfig)
    amqp: AMQPConfig = field(default_factory=AMQPConfig)
    sqs: SQSConfig = field(default_factory=SQSConfig)
    dynamodb: DynamoDBConfig = field(default_factory=DynamoDBConfig)
    gcppubsub: GCPPubSubConfig = field(default_factory=GCPPubSubConfig)
    mongodb: MongoDBConfig = field(default_factory=MongoDBConfig)

    def __post_init__(self) -> None:
        self._reloader: _Reloader | None = None
        self.validate()

    # ------------------------------------------------------------------ derived values

    @property
    def result_backend_url(self) -> str:
        return self.result_backend or self.broker

    @property
    def lock_url(self) -> str:
        return self.lock or self.result_backend_url

    @property
    def results_ttl(self) -> int:
        """Seconds results live; Go treats 0 as its default of 3600."""
        return self.results_expire_in or 3600

    def broker_urls(self) -> list[str]:
        """The broker URLs to try in order (several when ``multiple_broker_separator`` is set)."""
        if self.multiple_broker_separator:
            return [u.strip() for u in self.broker.split(self.multiple_broker_separator) if u.strip()]
        return [self.broker]

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid field and its value."""
        for url in self.broker_urls():
            check_url("broker", url)
        check_url("result_backend", self.result_backend_url)
        check_url("lock", self.lock_url)
        if not isinstance(self.results_expire_in, int) or self.results_expire_in < 0:
            raise ConfigError(
                f"results_expire_in must be a whole number of seconds >= 0, got {self.results_expire_in!r}"
            )
        if not self.default_queue:
            raise ConfigError("default_queue must not be empty")
        if self.heartbeat_timeout <= 0:
            raise ConfigError(f"heartbeat_timeout must be > 0 seconds, got {self.heartbeat_timeout!r}")
        if self.unknown_task_grace < 0:
            raise ConfigError(f"unknown_task_grace must be >= 0 seconds, got {self.unknown_task_grace!r}")
        if self.unregistered_task_timeout < 0:
            raise ConfigError(
                f"unregistered_task_timeout must be >= 0 seconds (0: never), got {self.unregistered_task_timeout!r}"
            )
        for name, value in (
            ("redis.normal_tasks_poll_period", self.redis.normal_tasks_poll_period),
            ("redis.delayed_tasks_poll_period", self.redis.delayed_tasks_poll_period),
            ("amqp.prefetch_count", self.amqp.prefetch_count),
            ("sqs.wait_time_seconds", self.sqs.wait_time_seconds),
        ):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if not 1 <= self.sqs.max_delay_seconds <= 900:
            raise ConfigError(f"sqs.max_delay_seconds must be 1-900 (SQS's limit), got {self.sqs.max_delay_seconds!r}")
        if not 10 <= self.gcppubsub.ack_deadline <= 600:
            raise ConfigError(f"gcppubsub.ack_deadline must be 10-600 seconds, got {self.gcppubsub.ack_deadline!r}")

    # ------------------------------------------------------------------ loaders

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read Go Machinery's environment variables (``BROKER``, ``REDIS_*``, ``AMQP_*``...)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in _SECTIONS:
                section: dict[str, Any] = {}
                for sf in dataclasses.fields(_SECTIONS[f.name]):
                    _read_env(env, sf, f"{f.name}.{sf.name}", _SECTIONS[f.name], section)
                values[f.name] = _SECTIONS[f.name](**section)
            else:
                _read_env(env, f, f.name, cls, values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], reload: bool = False) -> Config:
        """Read a Go Machinery YAML file; with ``reload=True`` changes are applied while running."""
        config = cls(**_yaml_values(Path(path)))
        if reload:
            config._reloader = _Reloader(config, Path(path))
            config._reloader.start()
        return config

    def stop_reloading(self) -> None:
        """Stop watching the YAML file this config was read from."""
        if self._reloader is not None:
            self._reloader.stop()
            self._reloader = None

    def _replace_from(self, other: Config) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))


def redact_url(url: str) -> str:
    """``url`` with its password hidden, for logs and error messages."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user, has_password, _ = credentials.partition(":")
    if not has_password or not user:  # a single userinfo word is the password (Go's Redis URLs)
        return f"{scheme}://***@{host}"
    return f"{scheme}://{user}:***@{host}"


def _coerce(value: Any, hint: Any, name: str, from_text: bool) -> Any:
    """Turn a YAML or environment value into the field's type, or raise ConfigError."""
    text_hint = str(hint)
    try:
        if value is None and "None" in text_hint:
            return None
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in {"1", "true", "yes", "on", "0", "false", "no", "off", ""}:
                return str(value).lower() in {"1", "true", "yes", "on"}
            raise ValueError
        if hint is int or text_hint.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and not from_text:
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool) or (isinstance(value, str) and not from_text):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str) and not from_text:
                if isinstance(value, (dict, list, bool)) or value is None:
                    raise ValueError
                return str(value)
            return str(value)
        if text_hint.startswith("dict"):
            if isinstance(value, dict):
                return dict(value)
            if from_text:
                return _parse_pairs(str(value))
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    kind = getattr(hint, "__name__", text_hint)
    raise ConfigError(f"{name} must be {kind}, got {value!r}")


def _parse_pairs(text: str) -> dict[str, Any]:
    """``k:v,k2:v2`` as Go's envconfig writes maps; numeric values become integers."""
    pairs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(item)
        pairs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return pairs


def _read_env(env: Mapping[str, str], f: dataclasses.Field[Any], name: str, owner: type, out: dict[str, Any]) -> None:
    for var in f.metadata.get("env", ()):
        if var in env:
            out[f.name] = _coerce(env[var], get_type_hints(owner)[f.name], f"{name} (${var})", from_text=True)
            return


def _yaml_values(path: Path) -> dict[str, Any]:
    import yaml  # here, not at the top: most processes never read a config file

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    values: dict[str, Any] = {}
    hints = get_type_hints(Config)
    by_key = {f.metadata["yaml"]: f for f in dataclasses.fields(Config) if "yaml" in f.metadata}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {value!r}")
            values[key] = _section_from_yaml(key, value)
        elif key in by_key:
            f = by_key[key]
            values[f.name] = _coerce(value, hints[f.name], key, from_text=False)
        else:
            log.logger.warning("config file %s: unknown key %r ignored", path, key)
    return values


def _section_from_yaml(section: str, data: dict[str, Any]) -> Any:
    cls = _SECTIONS[section]
    hints = get_type_hints(cls)
    by_key = {f.metadata["yaml"]: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in by_key:
            log.logger.warning("config: unknown key %s.%s ignored", section, key)
            continue
        f = by_key[key]
        values[f.name] = _coerce(value, hints[f.name], f"{section}.{key}", from_text=False)
    return cls(**values)


class _Reloader:
    """Re-reads a YAML file when it changes and updates the running Config in place."""

    def __init__(self, config: Config, path: Path) -> None:
        self._config = config
        self._path = path
        self._stop = threading.Event()
        self._mtime = self._stat()
        self._thread = threading.Thread(target=self._run, name="machinery-config-reload", daemon=True)

    def _stat(self) -> float | None:
        try:
            return self._path.stat().st_mtime_ns
        except OSError:
            return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(RELOAD_INTERVAL):
            mtime = self._stat()
            if mtime is None or mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                fresh = Config(**_yaml_values(self._path))
            except ConfigError as exc:
                log.logger.error("config reload from %s failed, keeping the old values: %s", self._path, exc)
                continue
            old = self._config
            for name in ("broker", "result_backend", "lock", "default_queue"):
                if getattr(fresh, name) != getattr(old, name):
                    log.logger.warning("config reload: %s changed; restart to apply it", name)
                    setattr(fresh, name, getattr(old, name))
            old._replace_from(fresh)
            log.logger.info("config reloaded from %s", self._path)
