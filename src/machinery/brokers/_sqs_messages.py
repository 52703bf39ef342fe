"""How machinery's messages travel in SQS requests: bodies as SQS text, FIFO group ids, ETAs
read back from a body, and deletes and visibility changes in SQS's batches of ten."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ..errors import ConfigError, MachineryError, MessageDecodeError, UnsupportedOperation
from ..signature import Signature

#: SQS's limit of messages per batch call.
BATCH = 10
#: What an SQS body may not hold: it is XML text (#x9, #xA, #xD, #x20-#xD7FF, #xE000-#xFFFD, above).
_NOT_SQS_TEXT = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def sqs_text(body: bytes, queue: str) -> str:
    """``body`` as the text SQS carries; UnsupportedOperation when SQS cannot carry it (empty,
    bytes that are not UTF-8, or characters XML forbids): the signatures machinery and Go send are
    JSON and always can."""
    if not body:
        raise UnsupportedOperation(f"SQS cannot carry an empty message body (for {queue!r}): SQS needs one character")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedOperation(
            f"SQS cannot carry this message body for {queue!r}: SQS bodies are text and it is not UTF-8 ({exc})"
        ) from None
    bad = _NOT_SQS_TEXT.search(text)
    if bad is not None:
        raise UnsupportedOperation(
            f"SQS cannot carry this message body for {queue!r}: it holds {bad.group()!r} at {bad.start()}, "
            "a character SQS bodies may not contain"
        )
    return text


def message_body(message: dict[str, Any]) -> bytes:
    """The bytes of a received message (its text as it was sent)."""
    return str(message.get("Body", "")).encode("utf-8", errors="surrogateescape")


def single_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A batch entry as the arguments of a single SendMessage (without its batch Id)."""
    single = dict(entry)
    single.pop("Id", None)
    return single


def group_id(body: bytes, queue: str) -> str:
    """The FIFO group of a message: its BrokerMessageGroupId, required as Go requires it."""
    try:
        group = Signature.decode(body).broker_message_group_id
    except MessageDecodeError:
        group = ""
    if not group:
        raise ConfigError(
            f"please specify BrokerMessageGroupId attribute for task Signature when submitting a task to FIFO "
            f"queue {queue!r}"
        )
    return group


def seconds_to_eta(body: bytes) -> float:
    """Seconds until the message's ETA (<= 0: due, or no ETA, or not a task)."""
    try:
        eta = Signature.decode(body).eta
    except MessageDecodeError:
        return 0.0
    if eta is None:
        return 0.0
    return (eta - datetime.now(timezone.utc)).total_seconds()


async def delete_messages(sqs: Any, url: str, handles: Sequence[str]) -> None:
    """Delete by receipt handles in batches; a handle that is no longer valid is not an error."""
    for start in range(0, len(handles), BATCH):
        chunk = handles[start : start + BATCH]
        if len(chunk) == 1:
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=chunk[0])
            continue
        entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
        response = await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
        failed = [f for f in response.get("Failed") or [] if f.get("Code") != "ReceiptHandleIsInvalid"]
        if failed:
            reasons = "; ".join(f"{f.get('Code')}: {f.get('Message')}" for f in failed)
            raise MachineryError(f"SQS did not delete {len(failed)} message(s): {reasons}")


async def change_visibility(sqs: Any, url: str, handles: Sequence[str], seconds: int) -> None:
    """Set the visibility timeout of received messages, in batches."""
    for start in range(0, len(handles), BATCH):
        chunk = handles[start : start + BATCH]
        entries = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": seconds} for i, h in enumerate(chunk)]
        await sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
