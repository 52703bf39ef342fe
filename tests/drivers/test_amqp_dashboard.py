"""RabbitMQ cannot list delayed tasks: the dashboard says so instead of failing."""

from __future__ import annotations

import urllib.request

from machinery import AMQPConfig, Config, Server, Signature
from machinery._sync import run_sync
from machinery.dashboard import create_app
from support.asgi import serving
from support.fixtures import unique
from support.services import AMQP_URL, require_service


def test_the_overview_says_what_rabbitmq_cannot_answer() -> None:
    require_service("RabbitMQ", AMQP_URL, 5672)
    queue = unique("dash_amqp")
    server = Server(
        Config(
            broker=AMQP_URL,
            result_backend=AMQP_URL,
            default_queue=queue,
            amqp=AMQPConfig(exchange=f"{queue}_ex", binding_key=queue),
        )
    )
    try:
        server.send_task(Signature("anything"))
        with serving(create_app(server)) as base, urllib.request.urlopen(f"{base}/partials/overview") as response:
            page = response.read().decode()
        assert f'data-queue="{queue}"' in page
        assert "not available on this broker" in page  # the delayed column
        assert "<td>1</td>" in page  # the waiting task, counted by RabbitMQ
    finally:
        run_sync(server.broker.delete_queue(queue))
