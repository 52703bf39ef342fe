"""Ping where nothing answers: the driver's connection error, for ``machinery ping`` to report.

(The operations seam on every driver is tests/contract/test_operations.py.)
"""

from __future__ import annotations

import pytest

from machinery import Config, Server
from machinery.errors import BrokerConnectionError


def _redis_down() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.ConnectionError,)


@pytest.mark.parametrize(
    ("url", "errors"),
    [("redis://127.0.0.1:1/0", _redis_down()), ("amqp://guest:guest@127.0.0.1:1/", (BrokerConnectionError,))],
    ids=["redis", "amqp"],
)
async def test_ping_raises_when_nothing_answers(url: str, errors: tuple[type[BaseException], ...]) -> None:
    server = Server(Config(broker=url))
    with pytest.raises(errors):
        await server.broker.ping()
    with pytest.raises(errors):
        await server.backend.ping()
