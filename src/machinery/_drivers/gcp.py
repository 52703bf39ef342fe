"""One Google Cloud Pub/Sub setup: the official library's asyncio clients, one pair per event
loop, reaching the emulator when ``PUBSUB_EMULATOR_HOST`` (or ``GCPPubSubConfig.endpoint``)
says so, and Google's errors as machinery's.

The official ``google-cloud-pubsub`` is used for its generated asyncio clients
(``PublisherAsyncClient``, ``SubscriberAsyncClient``): they are kept in step with the API by
Google and speak gRPC on the worker's own loop. Its high-level streaming subscriber runs
callbacks on threads and leases messages itself, which would hide the at-least-once rules
here, so messages are pulled, extended, acked and nacked explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.api_core import exceptions as google
from google.auth import exceptions as auth
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

from .._loops import PerLoop
from ..errors import BrokerConnectionError, ConfigError

#: Errors that mean Pub/Sub could not be reached (retried by callers with a back-off).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    google.ServiceUnavailable,
    google.DeadlineExceeded,
    google.RetryError,
)


@dataclass
class _LoopClients:
    lock: asyncio.Lock
    publisher: Any = None
    subscriber: Any = None


class PubSubClients:
    """Publisher and subscriber clients for the running event loop."""

    def __init__(self, project: str, endpoint: str) -> None:
        self.project = project
        self.emulator = endpoint or os.environ.get("PUBSUB_EMULATOR_HOST", "")
        self._loops: PerLoop[_LoopClients] = PerLoop(lambda: _LoopClients(asyncio.Lock()))

    async def _clients(self) -> _LoopClients:
        holder = self._loops.get()
        if holder.publisher is None:
            async with holder.lock:
                if holder.publisher is None:
                    holder.publisher, holder.subscriber = self._create()
        return holder

    def _create(self) -> tuple[Any, Any]:
        if self.emulator:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            publisher = PublisherAsyncClient(
                transport=PublisherGrpcAsyncIOTransport(
                    host=self.emulator, credentials=credentials, channel=grpc.aio.insecure_channel(self.emulator)
                )
            )
            subscriber = SubscriberAsyncClient(
                transport=SubscriberGrpcAsyncIOTransport(
                    host=self.emulator, credentials=credentials, channel=grpc.aio.insecure_channel(self.emulator)
                )
            )
            return publisher, subscriber
        try:
            return PublisherAsyncClient(), SubscriberAsyncClient()
        except auth.DefaultCredentialsError as exc:
            raise ConfigError(
                f"no Google Cloud credentials for Pub/Sub ({exc}); set GOOGLE_APPLICATION_CREDENTIALS, run "
                "gcloud auth application-default login, or set PUBSUB_EMULATOR_HOST for the emulator"
            ) from None

    @contextlib.asynccontextmanager
    async def call(self, doing: str) -> AsyncIterator[tuple[Any, Any]]:
        """(publisher, subscriber) to make requests with; errors come out as machinery's."""
        holder = await self._clients()
        try:
            yield holder.publisher, holder.subscriber
        except (google.PermissionDenied, google.Unauthenticated) as exc:
            raise ConfigError(f"{doing}: Pub/Sub refused the credentials ({exc.message})") from None
        except CONNECTION_ERRORS as exc:
            where = self.emulator or "pubsub.googleapis.com"
            raise BrokerConnectionError(f"{doing}: cannot reach Pub/Sub at {where}: {exc}") from exc
        except auth.DefaultCredentialsError as exc:
            raise ConfigError(f"{doing}: no Google Cloud credentials ({exc})") from None

    def topic(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    async def close(self) -> None:
        """Close the running loop's channels; those of other loops are theirs to close."""
        holder = self._loops.pop()
        if holder is not None and holder.publisher is not None:
            for client in (holder.publisher, holder.subscriber):
                with contextlib.suppress(Exception):
                    await client.transport.close()
