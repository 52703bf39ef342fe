"""Unique tasks: ``add.send(1, 2, unique_for=600)`` sends nothing new while an equal task is
pending or running; it returns the AsyncResult of the one already sent.

The key (``unique_key``, or the task's name and arguments) is claimed in the cluster-wide lock
with the task's UUID before PENDING is written, for ``unique_for`` seconds at most, and let
go when that task's outcome is final (SUCCESS or FAILURE; a RETRY keeps it), just before that
outcome is stored: whoever the final state wakes can send the next equal task at once. A worker that dies
without finishing it leaves the claim to expire by itself. Only single sends are made unique;
the members of a group or chord are always sent.
"""

from __future__ import annotations

from collections.abc import Callable

from .controls import unique_claim
from .locks.base import Lock
from .middleware import HookResult, Middleware, Outcome
from .signature import Signature
from .state import COMPLETED_STATES

KEY_PREFIX = "machinery_unique_"


async def existing_equal(lock: Lock, signature: Signature) -> str | None:
    """The UUID of the equal task that holds ``signature``'s unique key, or None (this send
    now holds it, or asked for no uniqueness)."""
    claim = unique_claim(signature)
    if claim is None:
        return None
    key, seconds = claim
    holder = await lock.claim(KEY_PREFIX + key, signature.uuid, seconds)
    return holder if holder is not None and holder != signature.uuid else None  # (a retry is its own)


class ReleaseUnique(Middleware):
    """Lets go of a unique task's key once its outcome is final (after the retries have
    revised it: this runs after the built-in ``Retries``)."""

    def __init__(self, lock: Callable[[], Lock]) -> None:
        self._lock = lock

    def before_store(self, signature: Signature, outcome: Outcome) -> HookResult:
        claim = unique_claim(signature)
        if claim is None or outcome.state not in COMPLETED_STATES:
            return None
        return self._release(KEY_PREFIX + claim[0], signature.uuid)

    async def _release(self, key: str, task_uuid: str) -> None:
        await self._lock().release(key, task_uuid)
