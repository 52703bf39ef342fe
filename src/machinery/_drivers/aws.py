"""One aiobotocore setup for the SQS broker and the DynamoDB backend: where the endpoint and
region come from, a client per event loop, and AWS errors as machinery's.

Credentials come from the SDK's usual chain (environment, profiles, instance roles). The
endpoint is, in order: the config's ``endpoint_url``, the SDK's own settings
(``AWS_ENDPOINT_URL_<SERVICE>``, ``AWS_ENDPOINT_URL``), then the URL machinery was given when
its host is not AWS's (a local server).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as boto

from .._loops import PerLoop
from ..config import redact_url
from ..errors import BrokerConnectionError, ConfigError

_AWS_HOST = re.compile(r"^(?P<service>[a-z0-9-]+)\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
#: Error codes that mean the credentials are missing, wrong or expired.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "AccessDeniedException",
        "MissingAuthenticationToken",
    }
)
#: Exceptions that mean the service could not be reached (retried by callers with a back-off).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    boto.EndpointConnectionError,
    boto.ConnectionClosedError,
    boto.ConnectTimeoutError,
    boto.ReadTimeoutError,
    boto.HTTPClientError,
)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    if isinstance(exc, boto.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def region_of(url: str) -> str:
    """The region in an AWS endpoint URL's host (``sqs.us-east-2.amazonaws.com``), or ``""``."""
    match = _AWS_HOST.match(urlsplit(url).hostname or "")
    return match.group("region") if match else ""


def endpoint_for(service_env: str, configured: str, url: str) -> str | None:
    """The endpoint to send requests to; None lets the SDK choose (AWS's for the region)."""
    if configured:
        return configured
    if os.environ.get(f"AWS_ENDPOINT_URL_{service_env}") or os.environ.get("AWS_ENDPOINT_URL"):
        return None  # the SDK reads these itself
    parts = urlsplit(url)
    if parts.hostname and not _AWS_HOST.match(parts.hostname):
        return f"{parts.scheme}://{parts.netloc}"
    return None


class _LoopClient:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.stack: contextlib.AsyncExitStack | None = None
        self.client: Any = None


class AWSClients:
    """Hands out an aiobotocore client of ``service`` for the running event loop."""

    def __init__(self, service: str, what: str, url: str, endpoint_url: str | None, region: str) -> None:
        self.service = service
        self.what = what
        self.url = url
        self.endpoint_url = endpoint_url
        self.region = region or region_of(url) or None
        self._loops: PerLoop[_LoopClient] = PerLoop(_LoopClient)

    async def client(self) -> Any:
        """The running loop's client, created on first use."""
        holder = self._loops.get()
        if holder.client is None:
            async with holder.lock:
                if holder.client is None:
                    stack = contextlib.AsyncExitStack()
                    config = AioConfig(
                        connect_timeout=10, read_timeout=70, retries={"max_attempts": 3, "mode": "standard"}
                    )
                    try:
                        holder.client = await stack.enter_async_context(
                            get_session().create_client(
                                self.service, region_name=self.region, endpoint_url=self.endpoint_url, config=config
                            )
                        )
                    except boto.NoRegionError:
                        raise ConfigError(
                            f"no AWS region for the {self.what} at {redact_url(self.url)}: set AWS_REGION (or "
                            "AWS_DEFAULT_REGION), a profile's region, or the config section's region"
                        ) from None
                    holder.stack = stack
        return holder.client

    @contextlib.asynccontextmanager
    async def call(self, doing: str) -> AsyncIterator[Any]:
        """A client to make requests with; AWS errors come out as machinery's, saying ``doing``."""
        client = await self.client()
        try:
            yield client
        except (boto.NoCredentialsError, boto.PartialCredentialsError) as exc:
            raise ConfigError(
                f"{doing} on {self.what} {redact_url(self.url)}: no AWS credentials ({exc}); set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role"
            ) from None
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"{doing}: cannot reach {self.what} at {self._where()}: {exc}") from exc
        except boto.ClientError as exc:
            if error_code(exc) in _CREDENTIAL_CODES:
                raise ConfigError(
                    f"{doing} on {self.what} {redact_url(self.url)}: AWS refused the credentials ({exc})"
                ) from None
            raise

    def _where(self) -> str:
        return self.endpoint_url or redact_url(self.url)

    async def close(self) -> None:
        """Close the running loop's client; clients of other loops are theirs to close."""
        holder = self._loops.pop()
        if holder is not None and holder.stack is not None:
            await holder.stack.aclose()
