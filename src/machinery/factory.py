"""URL scheme -> broker, result backend and lock implementations.

A new implementation is one module and one line here; nothing else names a concrete class.
Implementations are imported only when used, so a Redis user never imports aio-pika.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:
    from .backends.base import Backend
    from .brokers.base import Broker
    from .config import Config
    from .locks.base import Lock

_REDIS = ("redis", "rediss", "redis+socket")
_AMQP = ("amqp", "amqps")

BROKERS: dict[str, str] = {
    **{scheme: "machinery.brokers.redis:RedisBroker" for scheme in _REDIS},
    **{scheme: "machinery.brokers.amqp:AMQPBroker" for scheme in _AMQP},
    "sqlite": "machinery.brokers.sqlite:SQLiteBroker",
    "memory": "machinery.brokers.memory:MemoryBroker",
}
BACKENDS: dict[str, str] = {
    **{scheme: "machinery.backends.redis:RedisBackend" for scheme in _REDIS},
    **{scheme: "machinery.backends.amqp:AMQPBackend" for scheme in _AMQP},
    "sqlite": "machinery.backends.sqlite:SQLiteBackend",
    "memory": "machinery.backends.memory:MemoryBackend",
}
LOCKS: dict[str, str] = {
    **{scheme: "machinery.locks.redis:RedisLock" for scheme in _REDIS},
    "sqlite": "machinery.locks.sqlite:SQLiteLock",
    "memory": "machinery.locks.memory:MemoryLock",
}


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower() if "://" in url else ""


def _check(url: str, field: str, table: dict[str, str]) -> str:
    scheme = scheme_of(url)
    if scheme not in table:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(
            f"{field} URL {url!r} has {shown}; supported schemes are " + ", ".join(f"{s}://" for s in sorted(table))
        )
    return scheme


def check_broker_url(url: str, field: str = "broker") -> None:
    _check(url, field, BROKERS)


def check_backend_url(url: str, field: str = "result_backend") -> None:
    _check(url, field, BACKENDS)


def check_lock_url(url: str, field: str = "lock") -> None:
    if scheme_of(url) not in LOCKS:
        return  # like Go: a lock URL it cannot use falls back to the in-process lock
    _check(url, field, LOCKS)


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if exc.name == module:
            raise
        extra = module.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{module} needs a package that is not installed ({exc.name}); "
            f"install it with: pip install 'machinery[{extra}]'"
        ) from None


def create_broker(config: Config) -> Broker:
    url = config.broker_urls()[0]
    cls = _load(BROKERS[_check(url, "broker", BROKERS)])
    broker: Broker = cls(config)
    return broker


def create_backend(config: Config) -> Backend:
    url = config.result_backend_url
    cls = _load(BACKENDS[_check(url, "result_backend", BACKENDS)])
    backend: Backend = cls(config, url)
    return backend


def create_lock(config: Config) -> Lock:
    url = config.lock_url
    scheme = scheme_of(url)
    cls = _load(LOCKS[scheme] if scheme in LOCKS else LOCKS["memory"])
    lock: Lock = cls(config, url)
    return lock
