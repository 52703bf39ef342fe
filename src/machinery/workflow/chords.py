"""Completing chords on the worker (docs/wire.md §6.3 steps 3-9), as built-in middleware.

Go's chord steps, with two fixes that keep the promise "a chord callback fires exactly once":

* the chord is evaluated after a member *fails* too, so a chord whose last member to
  finish fails still settles (its callback is recorded as FAILURE, never sent) instead of
  leaving everyone waiting;
* a crash between winning ``trigger_chord`` and publishing the callback is repaired: the
  member whose processing crashed is redelivered, finds the chord triggered but the
  callback without any stored state, and sends it itself (the callback UUID is fixed when
  the chord is built, so "has it been sent?" is one read). The winner and such a repairer
  both claim the callback with the cluster-wide lock before sending, so a winner that was
  only slow and a repairer never both send it.

The one window left is Go's own for every task: a process dying between writing the
callback's PENDING and publishing it.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import threading
from collections.abc import Callable

from .. import log
from .._backoff import persist
from .._loops import PerLoop
from ..backends.base import Backend
from ..dispatch import Dispatcher
from ..locks.base import Lock, now_ns
from ..middleware import HookResult, Middleware, Outcome
from ..signature import Signature
from ..state import COMPLETED_STATES, FAILURE, TaskState, utcnow
from ..types import Arg

#: Seconds a recovering member waits for a live winner to finish sending the callback.
RECOVERY_GRACE = 2.0
#: Seconds the chord's decider waits for a member that is being run a second time.
MEMBER_RERUN_WAIT = 60.0
#: Seconds a claim to send a chord callback lasts (winner and repairer both claim first).
CLAIM_SECONDS = 60
#: Claims a repairer tries, each after the previous claim expired, before giving up (it
#: then tries again from the start, its member still held).
CLAIM_ATTEMPTS = 3
#: Triggers in flight per event loop. Many chords finishing at once would otherwise all poll
#: Redis for Go's single global TriggerChordMutex (only one caller in the cluster can hold
#: it), exhausting the connection pool and stretching everyone's wait; waiting here costs
#: nothing. Other backends' triggers are one quick atomic write, barely slowed.
TRIGGERS_IN_FLIGHT = 4


def is_chord_member(signature: Signature) -> bool:
    # (A count of 0 never completes in Go either: it compares with equality.)
    return bool(signature.group_uuid) and signature.chord_callback is not None and signature.group_task_count > 0


class ChordCompletion(Middleware):
    """After a chord member finished (either way): fire the chord if its group is done."""

    def __init__(self, backend: Backend, lock: Callable[[], Lock], dispatcher: Dispatcher) -> None:
        self._backend = backend
        self._lock = lock
        self._dispatcher = dispatcher
        # Whether the member being processed arrived with a final state already stored (a
        # redelivery after a crash): only such a member may repair a lost callback. Set in
        # before_process, read in after_process: both run in the task's own context.
        self._redelivered: contextvars.ContextVar[bool] = contextvars.ContextVar(
            "machinery_chord_redelivered", default=False
        )
        # Groups this process is triggering right now. Members of one group often finish
        # together (their state writes share a round trip), and all of them then find the
        # group complete; one trigger per process is enough, since only one caller can win
        # anyway, and a trigger that fails is retried by its own member.
        self._triggering: set[str] = set()
        self._guard = threading.Lock()
        self._trigger_slots: PerLoop[asyncio.Semaphore] = PerLoop(lambda: asyncio.Semaphore(TRIGGERS_IN_FLIGHT))

    def before_process(self, signature: Signature) -> HookResult:
        # A results-off backend (``null``) keeps no states to decide a chord by: as Go's, whose
        # null GroupCompleted never finds a group sent elsewhere, the callback is not sent.
        if not self._backend.stores_results or not is_chord_member(signature):
            return None
        return self._note_redelivery(signature)

    async def _note_redelivery(self, signature: Signature) -> None:
        # Read before the worker writes RECEIVED, which would hide a stored final state.
        state = await persist(lambda: self._backend.get_state(signature.uuid), f"reading {signature.uuid}")
        self._redelivered.set(state is not None and state.is_completed())

    def after_process(self, signature: Signature, outcome: Outcome) -> HookResult:
        if outcome.state not in COMPLETED_STATES or not self._backend.stores_results or not is_chord_member(signature):
            return None
        return self.complete(signature, self._redelivered.get())

    async def complete(self, signature: Signature, redelivered: bool) -> None:
        """Exactly one caller wins ``trigger_chord`` and decides: send the callback with the
        members' results in group order (unless the callback is immutable), or, if a member
        failed, record FAILURE for the callback and never send it.

        Each step is retried until the backend answers (the member's message stays held).
        """
        callback = signature.chord_callback
        group_uuid = signature.group_uuid
        assert callback is not None
        backend = self._backend
        # The backend's own completion check: a cheap count on some backends (AMQP's group queue).
        if not await persist(
            lambda: backend.group_completed(group_uuid, signature.group_task_count),
            f"checking whether group {group_uuid} is complete",
        ):
            return
        # A redelivered member always asks itself, since it may be the one that has to
        # repair a lost callback.
        single = not redelivered
        if single and not self._start_trigger(group_uuid):
            return
        try:
            won, uncertain = await self._trigger(group_uuid, signature.group_task_count)
        finally:
            if single:
                self._end_trigger(group_uuid)
        # A trigger whose reply was lost may have flipped the flag for us: then nobody else
        # will send the callback, so act as a repairer would.
        redelivered = redelivered or uncertain
        if not won:
            if not (redelivered and await self._callback_lost(callback)):
                return
            log.logger.warning(
                "Chord %s was triggered but its callback %s was never sent (a worker stopped in between); "
                "sending it now",
                group_uuid,
                callback.uuid,
            )
        elif not await persist(lambda: self._claim(callback), f"claiming chord callback {callback.uuid}"):
            log.logger.info("Callback %s of chord %s is being sent by a redelivered member", callback.uuid, group_uuid)
            return
        await persist(lambda: self._decide(group_uuid, callback), f"sending the callback of chord {group_uuid}")

    async def _trigger(self, group_uuid: str, task_count: int) -> tuple[bool, bool]:
        """(won, uncertain): ``trigger_chord`` until it answers; ``uncertain`` if an attempt
        failed first (it may have flipped the flag before its reply was lost)."""
        failed = False

        async def attempt() -> bool:
            nonlocal failed
            try:
                async with self._trigger_slots.get():
                    return await self._backend.trigger_chord(group_uuid, task_count)
            except Exception:
                failed = True
                raise

        won = await persist(attempt, f"triggering the chord of group {group_uuid}")
        return won, failed and not won

    async def _decide(self, group_uuid: str, callback: Signature) -> None:
        backend = self._backend
        # Members in group order: the metadata's TaskUUIDs (for a Go chord on AMQP, which stores
        # none, the backend makes them up in completion order, Go's order there).
        meta = await backend.get_group_meta(group_uuid)
        member_uuids = meta.task_uuids if meta is not None else []
        states = await backend.get_states(member_uuids)
        args: list[Arg] = []
        failure = "" if member_uuids else "its group metadata is gone"
        for member_uuid, state in zip(member_uuids, states, strict=True):
            if state is not None and not state.is_completed():
                # Every member had completed; this one is being run again (a duplicate
                # delivery), so its final state is moments away. Do not mistake it for a failure.
                state = await backend.await_state(member_uuid, MEMBER_RERUN_WAIT)
            if state is None or not state.is_success():
                reason = state.error if state is not None else "its state is gone"
                failure = f"chord member {member_uuid} failed: {reason}"
                break
            if not callback.immutable:  # the callback's own flag, for chords (§6.3 step 8)
                # As Go: any result type is passed on; one no task can take fails the callback.
                args.extend(Arg.from_wire(r.type, r.value) for r in state.results or ())
        if failure:
            log.logger.info("Not sending callback %s of chord %s: %s", callback.uuid, group_uuid, failure)
            # Never sent, so there is no PENDING to take the creation time from: it is now.
            decided = TaskState(callback.uuid, FAILURE, callback.name, error=failure, created_at=utcnow())
            await backend.write_states([decided], False)
            return
        # A copy: should the send fail and this be tried again, the arguments are added once.
        to_send = copy.copy(callback)
        to_send.args = [*(callback.args or ()), *args]
        await self._dispatcher.send(to_send)

    def _start_trigger(self, group_uuid: str) -> bool:
        with self._guard:
            if group_uuid in self._triggering:
                return False
            self._triggering.add(group_uuid)
            return True

    def _end_trigger(self, group_uuid: str) -> None:
        with self._guard:
            self._triggering.discard(group_uuid)

    async def _callback_lost(self, callback: Signature) -> bool:
        return await persist(lambda: self._is_callback_lost(callback), f"looking for chord callback {callback.uuid}")

    async def _is_callback_lost(self, callback: Signature) -> bool:
        """True if this (redelivered) member should send a triggered chord's callback itself.

        It should when the callback has no stored state at all: whoever triggered the chord
        writes one (PENDING before publishing, or FAILURE) right after winning. The winner and
        a repairer both claim the callback before sending it (``_claim``), so that only one of
        them does even when the winner is merely slow; a short grace first lets a slow winner
        finish without a repair at all.
        """
        backend = self._backend
        if await backend.get_state(callback.uuid) is not None:
            return False
        await asyncio.sleep(RECOVERY_GRACE)
        for _ in range(CLAIM_ATTEMPTS):
            if await backend.get_state(callback.uuid) is not None:
                return False
            if await self._claim(callback):
                return await backend.get_state(callback.uuid) is None
            # Claimed by a winner that is sending it, or that died before it could: look again
            # once that claim has expired.
            await asyncio.sleep(CLAIM_SECONDS + 1)
        raise TimeoutError(f"chord callback {callback.uuid} stays claimed by someone who never sends it")

    async def _claim(self, callback: Signature) -> bool:
        """Take the right to send ``callback`` for ``CLAIM_SECONDS`` (the cluster-wide lock)."""
        key = "machinery_chord_callback_" + callback.uuid
        return await self._lock().lock(key, now_ns() + CLAIM_SECONDS * 1_000_000_000, retries=1)
