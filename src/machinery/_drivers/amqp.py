"""One RabbitMQ connection setup for the AMQP broker and result backend.

What lives here:

* URL handling: several broker URLs (``multiple_broker_separator``) are tried in order on
  every connect, like Go's ``AMQPConnector``; ``amqps://`` URLs use TLS (aiormq builds the
  SSL context, and accepts ``?cafile=...&certfile=...&keyfile=...`` in the URL).
* Reconnecting: a connect that fails on every URL is retried after Fibonacci pauses
  (0, 1, 1, 2, 3, 5 ... seconds), the same series Go's broker sleeps on; a session whose
  connection or channel died is replaced on the next use, so publishers carry on by
  themselves after RabbitMQ restarts or closes the connection.
* One ``Session`` per event loop: asyncio connections belong to the loop that opened them and
  machinery runs on several loops (a worker's, the sync face's, an application's), the same
  reason ``_drivers.redis.RedisConnector`` keeps a client per loop.
* AMQP integer widths: pamqp picks the smallest AMQP integer type that holds a Python int,
  while Go sends ``x-message-ttl``/``x-expires`` as ``int32`` on result queues and ``int64``
  on delay queues (docs/wire.md §10.3, 11.2). ``AMQPInt32``/``AMQPInt64`` keep Go's widths on the
  wire. (RabbitMQ compares integer arguments by value, so this is for byte-level parity.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from aio_pika.connection import make_url

from .. import log
from .._backoff import Backoff
from .._loops import PerLoop
from ..config import redact_url
from ..errors import BrokerConnectionError, ConfigError

#: Exceptions that mean "the connection or channel is unusable" (or a broker-side refusal).
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)

#: Seconds to wait for one TCP + AMQP handshake.
CONNECT_TIMEOUT = 10.0

#: Seconds to wait for an ack, nack or close to reach a connection (microseconds when it is
#: alive); past that the connection is taken for dead.
SETTLE_TIMEOUT = 10.0

#: Seconds to wait for a publish to be confirmed before it is an error to the caller.
PUBLISH_TIMEOUT = 30.0

#: Idle read channels kept per session (see ``Session.pooled_channel``).
CHANNEL_POOL = 32

#: How many rounds over every URL a publisher tries before the error reaches the caller:
#: with the Fibonacci pauses that is about 4 s of waiting (0 + 1 + 1 + 2).
PUBLISH_CONNECT_ATTEMPTS = 4


class PublishRejected(BrokerConnectionError):
    """RabbitMQ answered a publish with a nack: the message was not taken."""


# ---------------------------------------------------------------------------------- int widths


class AMQPInt32(int):
    """An int written to AMQP tables as a signed 32-bit integer (``I``), like Go's ``int32``."""


class AMQPInt64(int):
    """An int written to AMQP tables as a signed 64-bit integer (``l``), like Go's ``int64``."""


_hook_lock = threading.Lock()


def _install_int_width_hook() -> None:
    """Teach pamqp's table encoder the two fixed-width int types (other values are untouched)."""
    with _hook_lock:
        original = pamqp.encode.encode_table_value
        if getattr(original, "_machinery_widths", False):
            return

        def encode_table_value(value: Any) -> bytes:
            if isinstance(value, AMQPInt32):
                return b"I" + struct.pack(">i", value)
            if isinstance(value, AMQPInt64):
                return b"l" + struct.pack(">q", value)
            return original(value)

        encode_table_value._machinery_widths = True  # type: ignore[attr-defined]
        # field_table/field_array look the function up in their module at call time.
        pamqp.encode.encode_table_value = encode_table_value


_install_int_width_hook()


class _DropReportedConnectFailures(logging.Filter):
    """aiormq logs every failed connect at ERROR before raising it; the connector reports the
    failure itself (once, with the URL and what it does next), so that line is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_DropReportedConnectFailures())

INT32_MAX = 2**31 - 1


def expiry_ms_int32(seconds: int) -> AMQPInt32:
    """``seconds`` as Go's ``int32(seconds * 1000)``, clamped instead of wrapping around."""
    return AMQPInt32(min(INT32_MAX, max(0, seconds) * 1000))


# ---------------------------------------------------------------------------------- URLs


def split_urls(text: str, separator: str) -> list[str]:
    """The URLs in ``text`` (several when ``separator`` is set), each checked to be AMQP."""
    urls = [u.strip() for u in text.split(separator)] if separator else [text.strip()]
    urls = [u for u in urls if u]
    for url in urls:
        if urlsplit(url).scheme.lower() not in ("amqp", "amqps"):
            raise ConfigError(f"{url!r} is not an amqp:// or amqps:// URL")
    if not urls:
        raise ConfigError("no AMQP URL given")
    return urls


def is_dead(connection: AbstractConnection | None) -> bool:
    """True when ``connection`` can no longer be used (closed by either side)."""
    if connection is None or connection.is_closed:
        return True
    transport = getattr(connection, "transport", None)
    return transport is None or bool(transport.connection.is_closed)


# ---------------------------------------------------------------------------------- connector


class AMQPConnector:
    """Opens connections to one RabbitMQ deployment and keeps a ``Session`` per event loop."""

    def __init__(self, urls: Sequence[str], role: str) -> None:
        if not urls:
            raise ConfigError("no AMQP URL given")
        self.urls = list(urls)
        self.role = role
        self._slots: PerLoop[_Slot] = PerLoop(_Slot)

    def connection_name(self, purpose: str) -> str:
        """The name RabbitMQ shows for a connection (``rabbitmqctl list_connections client_properties``)."""
        return f"machinery {self.role}/{purpose} pid={os.getpid()} host={socket.gethostname()}"

    async def open_connection(self, purpose: str, attempts: int = 1) -> AbstractConnection:
        """Connect to the first URL that answers; retry every URL ``attempts`` rounds with backoff.

        Raises ``BrokerConnectionError`` naming every URL tried when all rounds fail.
        """
        backoff = Backoff()
        errors: list[str] = []
        for round_number in range(max(1, attempts)):
            if round_number:
                await asyncio.sleep(backoff.next())
            errors = []
            for url in self.urls:
                connection = aio_pika.Connection(
                    make_url(url), client_properties={"connection_name": self.connection_name(purpose)}
                )
                try:
                    await connection.connect(timeout=CONNECT_TIMEOUT)
                except AMQP_ERRORS as exc:
                    # Closed here: left to the garbage collector it warns of a close never awaited.
                    await quietly(connection.close())
                    errors.append(f"{redact_url(url)}: {type(exc).__name__}: {exc}")
                    log.logger.debug("AMQP connect to %s failed: %s", redact_url(url), exc)
                    continue
                if len(self.urls) > 1:
                    log.logger.info("AMQP %s connected to %s", purpose, redact_url(url))
                return connection
        raise BrokerConnectionError(f"cannot connect to RabbitMQ ({'; '.join(errors)})")

    async def session(self, attempts: int = PUBLISH_CONNECT_ATTEMPTS) -> Session:
        """The running loop's live session, reconnecting (with backoff) if it died."""
        slot = self._slots.get()
        session = slot.session
        if session is not None and session.alive:
            return session
        async with slot.lock:
            session = slot.session
            if session is not None and session.alive:
                return session
            if session is not None and not is_dead(session.connection):
                # Only the channel died (e.g. a refused declare): keep the connection.
                await session.reopen_channel()
                return session
            if session is not None:
                log.logger.info("AMQP %s connection lost; reconnecting", self.role)
                await session.close()
            connection = await self.open_connection(self.role, attempts)
            try:
                session = await Session.open(connection)
            except BaseException:
                await quietly(connection.close())
                raise
            slot.session = session
            slot.closer = await _close_at_loop_shutdown(session)
            return session

    async def close(self) -> None:
        """Close the running loop's session (other loops' sessions end with their loops)."""
        slot = self._slots.pop()
        if slot is not None and slot.session is not None:
            await slot.session.close()


class _Slot:
    """Per-loop holder; the lock is made lazily so that it binds to that loop."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.closer: AsyncIterator[None] | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


async def _close_at_loop_shutdown(session: Session) -> AsyncIterator[None]:
    """Close ``session`` when its event loop shuts down (``asyncio.run`` finishing).

    asyncio has no loop-closing hook, but ``asyncio.run`` finalizes every async generator
    still suspended in the loop (``shutdown_asyncgens``) before closing it; this one closes
    the connection then, so a worker thread's loop ending closes its connections cleanly
    instead of leaving sockets for the garbage collector.
    """

    async def closer() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await session.close()

    generator = closer()
    await generator.__anext__()
    return generator


class Session:
    """A connection with a publisher-confirm channel and a cache of what it has declared.

    Declarations are cached per connection (as Go caches its publisher connections per
    queue): a new connection declares everything again.
    """

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.declared: set[str] = set()
        self._exchanges: dict[str, AbstractExchange] = {}
        self._pool: list[AbstractChannel] = []

    @classmethod
    async def open(cls, connection: AbstractConnection) -> Session:
        channel = await connection.channel(publisher_confirms=True)
        return cls(connection, channel)

    @property
    def alive(self) -> bool:
        return not is_dead(self.connection) and not self.channel.is_closed

    async def reopen_channel(self) -> None:
        self.channel = await self.connection.channel(publisher_confirms=True)
        self._exchanges.clear()

    async def close(self) -> None:
        await quietly(self.connection.close())

    # ------------------------------------------------------------------ topology

    async def exchange(self, name: str, kind: str) -> AbstractExchange:
        """The exchange ``name``, declared durable and not auto-delete once per connection (docs/wire.md §10.1)."""
        exchange = self._exchanges.get(name)
        if exchange is not None:
            return exchange
        if not name:
            exchange = self.channel.default_exchange
        elif f"exchange:{name}" in self.declared:
            exchange = await self.channel.get_exchange(name, ensure=False)
        else:
            exchange = await self.channel.declare_exchange(name, kind, durable=True, auto_delete=False)
            self.declared.add(f"exchange:{name}")
        self._exchanges[name] = exchange
        return exchange

    async def queue(
        self,
        name: str,
        *,
        durable: bool,
        auto_delete: bool,
        arguments: dict[str, Any] | None,
        exchange: str = "",
        exchange_type: str = "direct",
        binding_key: str | None = None,
        binding_arguments: dict[str, Any] | None = None,
        cache: bool = True,
    ) -> int:
        """Declare queue ``name`` (and bind it when ``exchange`` is named); returns its message count.

        With ``cache`` a queue already declared on this connection is not declared again
        (and the count returned is 0).
        """
        key = f"queue:{exchange}:{name}:{binding_key}"
        if cache and key in self.declared:
            return 0
        declared = await self.channel.declare_queue(
            name, durable=durable, auto_delete=auto_delete, arguments=arguments or None
        )
        if exchange:
            await self.exchange(exchange, exchange_type)
            await declared.bind(
                exchange, binding_key if binding_key is not None else name, arguments=binding_arguments or None
            )
        if cache:
            self.declared.add(key)
        return int(declared.declaration_result.message_count or 0)

    def forget(self, name: str) -> None:
        """Drop cached declarations of queue ``name`` (it was deleted or found missing)."""
        self.declared = {key for key in self.declared if not (key.startswith("queue:") and f":{name}:" in key)}

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        exchange_type: str = "direct",
        mandatory: bool = False,
    ) -> bool:
        """Publish and wait for the broker's confirm.

        Returns False when ``mandatory`` and the message could not be routed (basic.return).
        Raises ``PublishRejected`` on a nack and ``BrokerConnectionError`` when the
        connection or channel is lost before the confirm arrives.
        """
        target = await self.exchange(exchange, exchange_type)
        with amqp_errors(f"publishing to {exchange or '(default exchange)'!r} with key {routing_key!r}"):
            try:
                result = await target.publish(message, routing_key, mandatory=mandatory, timeout=PUBLISH_TIMEOUT)
            except aiormq.exceptions.DeliveryError as exc:
                if isinstance(exc, aiormq.exceptions.PublishError):
                    return False
                raise PublishRejected(f"RabbitMQ refused a message for {routing_key!r} (nack): {exc}") from None
        return not isinstance(result, aiormq.abc.DeliveredMessage)

    # ------------------------------------------------------------------ side channels

    @asynccontextmanager
    async def side_channel(self, confirms: bool = False) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel, for operations that may close it (passive declares, locks)
        or whose unacked messages must go back to their queues when it closes (peeks)."""
        with amqp_errors("opening a channel"):
            channel = await self.connection.channel(publisher_confirms=confirms)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await quietly(channel.close())

    @asynccontextmanager
    async def pooled_channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel of its own for the duration of one read, reused afterwards only if the
        read ended cleanly (every message it took settled); on any error or cancellation it
        is closed, which hands back whatever it still held."""
        channel = self._pool.pop() if self._pool else None
        if channel is None or channel.is_closed:
            with amqp_errors("opening a channel"):
                channel = await self.connection.channel(publisher_confirms=False)
        clean = False
        try:
            yield channel
            clean = True
        finally:
            if clean and not channel.is_closed and len(self._pool) < CHANNEL_POOL:
                self._pool.append(channel)
            elif not channel.is_closed:
                await quietly(channel.close())


@contextmanager
def amqp_errors(what: str) -> Iterator[None]:
    """Turn aiormq/socket errors into ``BrokerConnectionError`` naming ``what`` failed."""
    try:
        yield
    except BrokerConnectionError:
        raise
    except AMQP_ERRORS as exc:
        raise BrokerConnectionError(f"RabbitMQ error while {what}: {type(exc).__name__}: {exc}") from exc


async def quietly(awaitable: Any) -> None:
    """Await a close; a connection that is already gone has nothing left to close."""
    try:
        await bounded(awaitable)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.logger.debug("ignored while closing an AMQP object: %s", exc)


async def bounded(awaitable: Any) -> Any:
    """Await an ack, nack or other fire-and-forget frame for at most ``SETTLE_TIMEOUT`` seconds
    (``asyncio.TimeoutError``, one of ``AMQP_ERRORS``, if the connection died under it)."""
    return await asyncio.wait_for(awaitable, SETTLE_TIMEOUT)


async def settle(delivered: aiormq.abc.DeliveredMessage, ack: bool) -> bool:
    """Ack (or nack with requeue) a delivery; False if its channel is gone.

    A delivery lives and dies with its channel: once that is closed RabbitMQ has already
    put the message back, so there is nothing to settle. The wait is bounded because aiormq
    can leave a frame queued for a connection that has just died without ever failing it.
    """
    tag = delivered.delivery_tag
    try:
        if tag is None:
            raise aiormq.exceptions.ChannelInvalidStateError("delivery without a tag")
        if ack:
            await bounded(delivered.channel.basic_ack(tag))
        else:
            await bounded(delivered.channel.basic_nack(tag, requeue=True))
        return True
    except asyncio.CancelledError:
        raise
    except AMQP_ERRORS as exc:  # asyncio.TimeoutError included
        log.logger.debug(
            "%s of a delivery skipped: its channel is gone and RabbitMQ redelivers it (%s)",
            "ack" if ack else "requeue",
            exc or type(exc).__name__,
        )
        return False


def message(
    body: bytes,
    *,
    priority: int = 0,
    headers: dict[str, Any] | None = None,
    expiration_ms: int | None = None,
    content_type: str | None = "application/json",
) -> aio_pika.Message:
    """A persistent JSON message with Go's properties (docs/wire.md §10.2): priority and headers
    only when set, no message id, timestamp, correlation id or reply-to."""
    from datetime import timedelta

    built = aio_pika.Message(
        body,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=priority or None,
        headers=headers or None,
        expiration=None if expiration_ms is None else timedelta(milliseconds=expiration_ms),
    )
    # aio-pika turns "no priority" into 0 and "no headers" into {}, and pamqp then sends both
    # properties; Go leaves them out (docs/wire.md §10.2), so take them out again.
    if not priority:
        built.priority = None
    if not headers:
        built.headers = None  # type: ignore[assignment]
    return built


async def take_messages(queue: AbstractQueue, limit: int | None = None) -> list[AbstractIncomingMessage]:
    """Take messages from ``queue`` (``basic.get``, not acked) until it is empty or ``limit`` are taken.

    The caller settles them, hands them back with ``give_back``, or closes the channel,
    which returns them to their original positions.
    """
    taken: list[AbstractIncomingMessage] = []
    while limit is None or len(taken) < limit:
        incoming = await queue.get(no_ack=False, fail=False, timeout=None)
        if incoming is None:
            break
        taken.append(incoming)
    return taken


async def give_back(taken: Sequence[AbstractIncomingMessage]) -> None:
    """Return every message taken on their channel to its original position (``basic.nack``
    multiple, requeue), so that delivery order is unchanged."""
    if taken:
        await bounded(taken[-1].nack(multiple=True, requeue=True))


async def peek_queue(channel: AbstractChannel, name: str) -> list[AbstractIncomingMessage]:
    """``take_messages`` from the existing queue ``name``; ``[]`` when there is no such queue
    (which closes ``channel``)."""
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return []
    return await take_messages(queue)


async def count_queue(channel: AbstractChannel, name: str, purge: bool = False) -> int:
    """The messages ready in the existing queue ``name`` (deleted first when ``purge``); 0 when
    there is no such queue (which closes ``channel``)."""
    underlay = await channel.get_underlay_channel()
    try:
        declared = await underlay.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    if not purge:
        return int(declared.message_count or 0)
    purged = await underlay.queue_purge(name)
    return int(purged.message_count or 0)


async def gather_all(jobs: Sequence[Awaitable[Any]]) -> None:
    """Run every job (publishes, mostly); raise the first error only after all have settled."""
    if not jobs:
        return
    if len(jobs) == 1:
        await jobs[0]
        return
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def on_close(target: Any, callback: Callable[[], None]) -> None:
    """Call ``callback()`` when a channel or connection closes, for any reason."""
    target.close_callbacks.add(lambda *_: callback())
