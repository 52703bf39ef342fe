"""The Consumer contract (brokers/base.py) on every broker: order, settling, sharing, reclaiming.

A consumer takes messages into a place of its own and they leave it only by ack, requeue or
dead letter; close gives back what it holds; a consumer that dies without closing loses
nothing. Every test runs on each broker (``broker_deployment``) through its harness.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from machinery import Server, Signature
from machinery.brokers.base import Consumer, Delivery
from support.deployment import Deployment
from support.waiting import WAIT


def signatures(d: Deployment, count: int, tag: str = "m") -> list[Signature]:
    return [Signature("add", [i, 0], uuid=f"task_{d.queue}_{tag}{i}", routing_key=d.queue) for i in range(count)]


def uuids(deliveries: list[Delivery]) -> list[str]:
    return [Signature.decode(delivery.body).uuid for delivery in deliveries]


async def take(consumer: Consumer, count: int, batch: int = 10) -> list[Delivery]:
    """Fetch until ``count`` messages are taken (a broker may hand them out a few at a time)."""
    taken: list[Delivery] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while len(taken) < count:
        assert loop.time() < deadline, f"took {len(taken)} of {count} messages within {WAIT} s"
        taken += await consumer.fetch(min(batch, count - len(taken)), 1.0)
    return taken


async def drain(consumer: Consumer, idle: float = 1.0) -> list[Delivery]:
    """Take and ack everything until nothing comes for ``idle`` seconds."""
    taken: list[Delivery] = []
    while deliveries := await consumer.fetch(10, idle):
        for delivery in deliveries:
            await consumer.ack(delivery)
        taken += deliveries
    return taken


@pytest.fixture
def server(broker_deployment: Deployment) -> Server:
    return broker_deployment.server()


async def test_fifo_order_and_ack(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    sigs = signatures(d, 5)
    for sig in sigs:
        await server.broker.publish(sig)
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [s.uuid for s in sigs]
    consumer = await server.broker.open_consumer(d.queue, "fifo", prefetch=2)
    first = await take(consumer, 2, batch=2)
    assert uuids(first) == [sigs[0].uuid, sigs[1].uuid]
    # Taken messages are no longer pending, and never handed out twice.
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == [s.uuid for s in sigs[2:]]
    assert await d.ataken_count(server=server) == 2
    for delivery in first:
        await consumer.ack(delivery)
    rest: list[Delivery] = []
    while len(rest) < 3:  # two at a time: a broker that pushes holds no more than the prefetch
        batch = await take(consumer, min(2, 3 - len(rest)))
        for delivery in batch:
            await consumer.ack(delivery)
        rest += batch
    assert uuids(rest) == [s.uuid for s in sigs[2:]]
    assert await consumer.fetch(10, 0.5) == []
    await consumer.close()
    assert await d.aqueued_bodies(server=server) == []
    assert await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_a_requeued_message_is_delivered_again(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    (sig,) = signatures(d, 1)
    await server.broker.publish(sig)
    consumer = await server.broker.open_consumer(d.queue, "requeue")
    (first,) = await take(consumer, 1)
    await consumer.requeue(first)
    (again,) = await take(consumer, 1)
    assert again.body == first.body  # unchanged
    await consumer.ack(again)
    await consumer.close()
    assert await d.aqueued_bodies(server=server) == [] and await d.ataken_count(server=server) == 0
    await server.aclose()


@pytest.mark.known_gap("requeue_to_the_back")
async def test_requeue_goes_to_the_back_and_close_returns_to_the_head(
    broker_deployment: Deployment, server: Server
) -> None:
    d = broker_deployment
    sigs = signatures(d, 3)
    await server.broker.publish_many(sigs)
    consumer = await server.broker.open_consumer(d.queue, "order", prefetch=1)
    (first,) = await take(consumer, 1)
    await consumer.requeue(first)
    expected = [sigs[1].uuid, sigs[2].uuid, sigs[0].uuid]
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == expected
    (second,) = await take(consumer, 1)
    assert uuids([second]) == [sigs[1].uuid]
    await consumer.close()  # never finished: back where it was, at the head
    assert [s.uuid for s in await server.broker.get_pending_tasks()] == expected
    await server.aclose()


@pytest.mark.known_gap("ordering")
async def test_close_returns_taken_messages_in_their_order(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    sigs = signatures(d, 4)
    await server.broker.publish_many(sigs)
    consumer = await server.broker.open_consumer(d.queue, "closer", prefetch=2)
    taken = await take(consumer, 2)
    assert uuids(taken) == [sigs[0].uuid, sigs[1].uuid]
    await consumer.close()
    assert [Signature.decode(b).uuid for b in await d.aqueued_bodies(server=server)] == [s.uuid for s in sigs]
    assert await d.ataken_count(server=server) == 0
    await server.aclose()


@pytest.mark.known_gap("exclusive_delivery")
async def test_two_consumers_never_share_a_message(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    sigs = signatures(d, 60)
    await server.broker.publish_many(sigs)
    a = await server.broker.open_consumer(d.queue, "a", prefetch=5)
    b = await server.broker.open_consumer(d.queue, "b", prefetch=5)
    got_a, got_b = await asyncio.gather(drain(a), drain(b))
    await asyncio.gather(a.close(), b.close())
    assert not set(uuids(got_a)) & set(uuids(got_b)), "a message was delivered to two consumers"
    assert sorted(uuids(got_a) + uuids(got_b)) == sorted(s.uuid for s in sigs)
    assert await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_a_fetch_cancelled_at_shutdown_leaves_nothing_taken(
    broker_deployment: Deployment, server: Server
) -> None:
    # A worker that stops cancels its fetch in flight. On Redis the fetch script used to run
    # after close() had given the processing list back, stranding the message in a list no
    # reaper looks at (its heartbeat was gone). Repeated because it is a race.
    d = broker_deployment
    bodies: list[bytes] = []
    for sig in signatures(d, 10):
        bodies.append(sig.encode())
        await d.apush_raw(bodies[-1], server=server)
        consumer = await server.broker.open_consumer(d.queue, "cancelled-fetch")
        fetch = asyncio.ensure_future(consumer.fetch(1, 0.2))
        await asyncio.sleep(0)  # the fetch is under way
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        await consumer.close()
        # whatever the fetch took is back at the head of the queue
        assert await d.aqueued_bodies(server=server) == bodies, f"round {len(bodies)}"
    assert await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_a_cancelled_fetch_on_a_live_consumer_loses_nothing(
    broker_deployment: Deployment, server: Server
) -> None:
    d = broker_deployment
    consumer = await server.broker.open_consumer(d.queue, "live")
    sigs = signatures(d, 20)
    for sig in sigs:
        await server.broker.publish(sig)
        fetch = asyncio.ensure_future(consumer.fetch(1, 1.0))
        await asyncio.sleep(0)
        fetch.cancel()
        await asyncio.gather(fetch, return_exceptions=True)
        if not fetch.cancelled():
            for delivery in fetch.result():
                await consumer.ack(delivery)
    await consumer.close()
    other = await server.broker.open_consumer(d.queue, "other")
    await drain(other)  # whatever the cancelled fetches took was handed back
    await other.close()
    assert await d.aqueued_bodies(server=server) == [] and await d.ataken_count(server=server) == 0
    await server.aclose()


@pytest.mark.known_gap("stale_ack")
async def test_a_dead_consumers_messages_are_reclaimed(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    (sig,) = signatures(d, 1)
    await server.broker.publish(sig)
    dead = await server.broker.open_consumer(d.queue, "dead", prefetch=1)
    (taken,) = await take(dead, 1)
    d.abandon(dead)  # goes silent, as a SIGKILLed worker would
    alive = await server.broker.open_consumer(d.queue, "alive", prefetch=1)
    (retaken,) = await take(alive, 1)  # within the heartbeat timeout and a generous margin
    assert retaken.body == taken.body
    await dead.ack(taken)  # too late: no longer the dead one's, nothing happens
    assert await d.ataken_count(server=server) == 1
    await alive.ack(retaken)
    await alive.close()
    assert await d.aqueued_bodies(server=server) == [] and await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_dead_letter_and_requeue_dead(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    # Byte for byte, undecodable; text on a broker that carries only text.
    body = "ünot a task".encode() if "non_text_bodies" in d.broker.gaps else b"\xffnot a task"
    before = datetime.now(timezone.utc) - timedelta(minutes=1)
    await d.apush_raw(body, server=server)
    consumer = await server.broker.open_consumer(d.queue, "dl")
    (delivery,) = await take(consumer, 1)
    await consumer.dead_letter(delivery, "cannot decode")
    assert await consumer.fetch(1, 0.5) == []
    (letter,) = await server.broker.dead_letters()
    assert (letter.queue, letter.reason, letter.body) == (d.queue, "cannot decode", body)
    assert before <= letter.time <= datetime.now(timezone.utc) + timedelta(minutes=1)
    assert await server.broker.dead_letters(d.other_queue()) == []
    assert await server.broker.requeue_dead() == 1
    assert await server.broker.dead_letters() == []
    (again,) = await take(consumer, 1)
    assert again.body == body
    await consumer.ack(again)
    await consumer.close()
    assert await d.aqueued_bodies(server=server) == [] and await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_pending_inspection_decodes_in_order_and_skips_garbage(
    broker_deployment: Deployment, server: Server
) -> None:
    d = broker_deployment
    sigs = signatures(d, 3)
    await server.broker.publish(sigs[0])
    await d.apush_raw(b"{garbage", server=server)
    await server.broker.publish_many(sigs[1:])
    pending = await server.broker.get_pending_tasks()
    assert [s.uuid for s in pending] == [s.uuid for s in sigs]  # listed, the garbage skipped ...
    bodies = await d.aqueued_bodies(server=server)
    assert b"{garbage" in bodies and len(bodies) == 4  # ... and left in place, like the rest
    assert await server.broker.get_pending_tasks(d.other_queue()) == []
    await server.aclose()


@pytest.mark.known_gap("delayed_inspection")
async def test_delayed_inspection(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    eta = datetime.now(timezone.utc) + timedelta(hours=1)
    later, soon = signatures(d, 2)
    later.eta, soon.eta = eta + timedelta(minutes=5), eta
    await server.broker.publish_many([later, soon])
    d.track_delay(later.eta)
    delayed = await server.broker.get_delayed_tasks()
    assert [s.uuid for s in delayed] == [soon.uuid, later.uuid]  # soonest first
    assert delayed[0].eta == eta
    assert await server.broker.get_pending_tasks() == []
    assert await d.aqueued_bodies(server=server) == []
    await server.aclose()


async def test_a_delayed_requeue_holds_nothing_and_comes_back(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    first, second = signatures(d, 2)
    await server.broker.publish_many([first, second])
    consumer = await server.broker.open_consumer(d.queue, "later", prefetch=1)
    (taken,) = await take(consumer, 1)
    assert uuids([taken]) == [first.uuid]
    await consumer.requeue(taken, delay=0.3)
    # Nothing holds it meanwhile: with room for one message, this consumer is handed both again.
    seen: list[str] = []
    while sorted(seen) != sorted([first.uuid, second.uuid]):
        for delivery in await take(consumer, 1):
            seen.append(Signature.decode(delivery.body).uuid)
            await consumer.ack(delivery)
    await consumer.close()
    assert await d.aqueued_bodies(server=server) == [] and await d.ataken_count(server=server) == 0
    await server.aclose()


async def test_fetch_takes_at_most_max_count(broker_deployment: Deployment, server: Server) -> None:
    d = broker_deployment
    await server.broker.publish_many(signatures(d, 6))
    consumer = await server.broker.open_consumer(d.queue, "bounded", prefetch=6)
    seen = 0
    while seen < 6:
        batch = await consumer.fetch(2, 1.0)
        assert len(batch) <= 2
        for delivery in batch:
            await consumer.ack(delivery)
        seen += len(batch)
    await consumer.close()
    await server.aclose()
