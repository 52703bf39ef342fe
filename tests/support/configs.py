"""Configs and looks for the tests of one named driver (unit and driver tests, outside the
contract suite, which goes through ``Deployment`` instead)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from machinery import Config, RedisConfig, Server
from machinery._sync import run_sync
from machinery.brokers.base import Consumer, Delivery

from .services import require_redis


def config_for(kind: str, tmp_path: Path, queue: str, **overrides: Any) -> Config:
    """A Config on ``kind`` (memory, sqlite, redis) isolated from every other test by ``queue``."""
    if kind == "memory":
        url = f"memory://{queue}"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'machinery.db'}"
    elif kind == "redis":
        url = require_redis()
    else:
        raise ValueError(kind)
    redis = RedisConfig(
        delayed_tasks_key=f"{queue}_delayed", normal_tasks_poll_period=200, delayed_tasks_poll_period=100
    )
    return Config(**{"broker": url, "default_queue": queue, "redis": redis, "results_expire_in": 600, **overrides})


def waiting_bodies(server: Server) -> set[str]:
    """UUIDs of the tasks waiting in the default queue or for their ETA (requeued for later)."""
    return {s.uuid for s in server.get_pending_tasks()} | {s.uuid for s in server.get_delayed_tasks()}


def push_raw(server: Server, *bodies: bytes, queue: str | None = None) -> None:
    """Put bytes straight onto ``queue`` (the default queue), as a foreign client might."""
    run_sync(server.broker._push([(queue or server.config.default_queue, body) for body in bodies]))


def count_requeues(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every body the worker's consumer gives back to the queue (the body itself, which
    the ``after_requeue`` middleware hook does not see)."""
    requeued: list[bytes] = []
    open_consumer = server.broker.open_consumer

    async def opening(queue: str, consumer_tag: str, prefetch: int | None = None) -> Consumer:
        consumer = await open_consumer(queue, consumer_tag, prefetch)
        requeue = consumer.requeue

        async def counting(delivery: Delivery, delay: float = 0.0) -> None:
            requeued.append(delivery.body)
            await requeue(delivery, delay)

        consumer.requeue = counting  # type: ignore[method-assign]
        return consumer

    monkeypatch.setattr(server.broker, "open_consumer", opening)
    return requeued
