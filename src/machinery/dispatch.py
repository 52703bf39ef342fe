"""The one send path, used by the server, the worker (retries, callbacks, chords), workflows and
the periodic scheduler alike:

    prepare (UUID, headers) -> before_publish -> PENDING written -> published -> after_publish

(the PENDING write and the publish are one round trip where the broker and the backend share
a server: ``Broker.publish_with_pending``).

As Go's ``SendTask``, PENDING is stored before the message exists, so no worker (Go's
included) can take a message whose state is not there yet. ``before_publish`` runs before the
write, so middleware that changes a signature (tracing headers) does so before anything of
it is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from . import log
from .backends.base import Backend
from .brokers.base import Broker
from .locks.base import Lock
from .middleware import MiddlewareStack
from .signature import Signature, new_task_uuid
from .uniqueness import existing_equal

ProgressHandler = Callable[[int, int], None]
"""Called as ``handler(published, total)`` while a batch is being published."""

#: Messages per ``publish_many`` call when the send concurrency is unlimited.
PUBLISH_BATCH = 1000
#: Batches in flight at once when the send concurrency is unlimited.
PUBLISH_PARALLEL = 4
#: PENDING states written per backend call.
PENDING_BATCH = 5000


class Dispatcher:
    """Sends signatures through one broker, recording them in one backend; ``lock`` (the
    cluster-wide lock, made on first use) keeps unique tasks unique."""

    def __init__(self, broker: Broker, backend: Backend, middleware: MiddlewareStack, lock: Callable[[], Lock]) -> None:
        self.broker = broker
        self.backend = backend
        self.middleware = middleware
        self.lock = lock

    @staticmethod
    def prepare(signature: Signature) -> Signature:
        """Fill what Go's SendTask fills before publishing: a UUID and empty headers."""
        if not signature.uuid:
            signature.uuid = new_task_uuid()
        if signature.headers is None:
            signature.headers = {}
        return signature

    async def send(self, signature: Signature) -> str:
        """Send one signature: PENDING first, then the message. Returns its UUID, or that of
        the equal task already sent when it asked to be unique (nothing is sent then)."""
        self.prepare(signature)
        if signature.headers and (existing := await existing_equal(self.lock(), signature)) is not None:
            return existing
        await self.middleware.before_publish(signature)
        await self.broker.publish_with_pending((signature,), self.backend)
        await self.middleware.after_publish(signature)
        return signature.uuid

    async def send_batch(
        self, signatures: Sequence[Signature], concurrency: int = 0, on_progress: ProgressHandler | None = None
    ) -> None:
        """Send many signatures: every PENDING first, then every message.

        At most ``concurrency`` messages are in flight at once (0: unlimited, published in
        batches of ``PUBLISH_BATCH``). A publish error is raised once the other batches have
        finished; the messages already published stay published.
        """
        if concurrency < 0:
            raise ValueError(f"send concurrency must be >= 0, got {concurrency}")
        for signature in signatures:
            self.prepare(signature)
            await self.middleware.before_publish(signature)
        # All PENDING before any publish: a late PENDING would overwrite the state of a
        # member a fast worker has already finished.
        for start in range(0, len(signatures), PENDING_BATCH):
            await self.backend.set_pending(signatures[start : start + PENDING_BATCH])
        await self._publish(signatures, concurrency, on_progress)
        for signature in signatures:
            await self.middleware.after_publish(signature)

    async def _publish(
        self, signatures: Sequence[Signature], concurrency: int, on_progress: ProgressHandler | None
    ) -> None:
        if concurrency > 0:
            # n messages per round trip, one round trip at a time: never more than n in flight.
            size, parallel = concurrency, 1
        else:
            size, parallel = PUBLISH_BATCH, PUBLISH_PARALLEL
        batches = [signatures[i : i + size] for i in range(0, len(signatures), size)]
        slots = asyncio.Semaphore(parallel)
        published = 0

        async def publish(batch: Sequence[Signature]) -> None:
            nonlocal published
            async with slots:
                await self.broker.publish_many(batch)
            published += len(batch)
            if on_progress is not None:
                on_progress(published, len(signatures))

        outcomes = await asyncio.gather(*(publish(b) for b in batches), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            log.logger.error(
                "Publishing %d messages: %d of %d batches failed (%d published)",
                len(signatures),
                len(errors),
                len(batches),
                published,
            )
            raise errors[0]
