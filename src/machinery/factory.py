"""URL scheme -> the broker, result backend and lock that serve it.

A new driver is one module and one line in these tables; nothing else names a concrete
class. Drivers are imported only when a URL asks for them, so a Redis user never imports
aio-pika, and a missing optional dependency is reported with the extra that brings it.

This module is a leaf on purpose: ``Config`` validates URLs against these tables, and the
seam packages (``brokers``, ``backends``, ``locks``) build instances from them.
"""

from __future__ import annotations

import importlib
import os
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

_REDIS = ("redis", "rediss", "redis+socket")
_AMQP = ("amqp", "amqps")

#: (module:class, the pip extra its dependencies come with) per URL scheme.
BROKERS: dict[str, tuple[str, str]] = {
    **{scheme: ("machinery.brokers.redis:RedisBroker", "redis") for scheme in _REDIS},
    **{scheme: ("machinery.brokers.amqp:AMQPBroker", "amqp") for scheme in _AMQP},
    "sqlite": ("machinery.brokers.sqlite:SQLiteBroker", ""),
    "memory": ("machinery.brokers.memory:MemoryBroker", ""),
    "https": ("machinery.brokers.sqs:SQSBroker", "sqs"),
    "http": ("machinery.brokers.sqs:SQSBroker", "sqs"),
    "gcppubsub": ("machinery.brokers.gcppubsub:GCPPubSubBroker", "gcp"),
}
BACKENDS: dict[str, tuple[str, str]] = {
    **{scheme: ("machinery.backends.redis:RedisBackend", "redis") for scheme in _REDIS},
    **{scheme: ("machinery.backends.amqp:AMQPBackend", "amqp") for scheme in _AMQP},
    "memcache": ("machinery.backends.memcache:MemcacheBackend", "memcache"),
    "mongodb": ("machinery.backends.mongo:MongoBackend", "mongodb"),
    "mongodb+srv": ("machinery.backends.mongo:MongoBackend", "mongodb"),
    "sqlite": ("machinery.backends.sqlite:SQLiteBackend", ""),
    "memory": ("machinery.backends.memory:MemoryBackend", ""),
    "https": ("machinery.backends.dynamodb:DynamoDBBackend", "dynamodb"),
    "null": ("machinery.backends.null:NullBackend", ""),
}
LOCKS: dict[str, tuple[str, str]] = {
    **{scheme: ("machinery.locks.redis:RedisLock", "redis") for scheme in _REDIS},
    "sqlite": ("machinery.locks.sqlite:SQLiteLock", ""),
    "memory": ("machinery.locks.memory:MemoryLock", ""),
    "https": ("machinery.locks.dynamodb:DynamoDBLock", "dynamodb"),
}
_TABLES = {"broker": BROKERS, "result_backend": BACKENDS, "lock": LOCKS}


def scheme_of(url: str) -> str:
    """The lower-case scheme of ``url``, or ``""`` when it has none (``null`` alone, Go's form of
    the results-off backend, counts as the scheme ``null``)."""
    if "://" not in url:
        return "null" if url.strip().lower() == "null" else ""
    return urlsplit(url).scheme.lower()


def check_url(kind: str, url: str, field: str | None = None) -> str:
    """Return the scheme of ``url`` if some driver of ``kind`` serves it; else raise ConfigError.

    ``kind`` is ``broker``, ``result_backend`` or ``lock``; ``field`` names the setting in the
    message (default: ``kind``). A lock URL no lock serves is not an error: as in Go, the
    in-process lock is used instead.
    """
    table = _TABLES[kind]
    scheme = scheme_of(url)
    if scheme in table:
        _check_cloud_url(kind, scheme, url, field)
        return scheme
    if kind == "lock":
        return "memory"
    shown = f"scheme {scheme!r}" if scheme else "no scheme"
    supported = ", ".join(f"{s}://" for s in sorted(table))
    raise ConfigError(f"{field or kind} URL {url!r} has {shown}; supported schemes are {supported}")


def _check_cloud_url(kind: str, scheme: str, url: str, field: str | None) -> None:
    """Go's rules for the URLs of the cloud drivers (docs/wire.md §13, §17)."""
    name = field or kind
    if kind == "broker" and scheme in ("http", "https"):
        if not url.startswith("https://sqs") and not os.environ.get("DISABLE_STRICT_SQS_CHECK"):
            raise ConfigError(
                f"{name} URL {url!r}: an SQS broker URL starts with https://sqs (the queue URL without the queue "
                "name); set DISABLE_STRICT_SQS_CHECK=1 to use another http(s):// queue base"
            )
    elif kind == "result_backend" and scheme == "https" and not url.startswith("https://dynamodb"):
        raise ConfigError(f"{name} URL {url!r}: a DynamoDB result backend URL starts with https://dynamodb")
    elif scheme == "gcppubsub":
        parts = url[len("gcppubsub://") :].split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{name} URL {url!r} must be gcppubsub://PROJECT/SUBSCRIPTION")


def driver_class(kind: str, url: str) -> Any:
    """The class serving ``url`` for ``kind``, imported now; ConfigError names a missing extra."""
    path, extra = _TABLES[kind][check_url(kind, url)]
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if exc.name == module or not extra:
            raise
        raise ConfigError(
            f"{url.partition('://')[0]}:// needs a package that is not installed ({exc.name}); "
            f"install it with: pip install 'machinery[{extra}]'"
        ) from None
