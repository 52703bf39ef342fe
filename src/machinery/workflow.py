"""Sending chains, groups and chords, and completing chords on the worker side (WIRE.md 6.3, 8).

Sending follows Go's ``SendChain``/``SendGroup``/``SendChord``; the worker side follows Go's
chord steps with two fixes that keep the promise "a chord callback fires exactly once":

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
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import log
from .locks.base import now_ns
from .result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from .signature import Chain, Chord, Group, Signature
from .state import FAILURE, TaskState, utcnow
from .types import Arg

if TYPE_CHECKING:
    from .server import Server

ProgressHandler = Callable[[int, int], None]
"""Called as ``handler(published, total)`` while a group is being published."""

#: Messages per ``publish_many`` call when the send concurrency is unlimited.
PUBLISH_BATCH = 1000
#: Batches in flight at once when the send concurrency is unlimited.
PUBLISH_PARALLEL = 4
#: PENDING states written per backend call.
PENDING_BATCH = 5000
#: Seconds a recovering member waits for a live winner to finish sending the callback.
RECOVERY_GRACE = 2.0
#: Seconds the chord's decider waits for a member that is being run a second time.
MEMBER_RERUN_WAIT = 60.0
#: Seconds a claim to send a chord callback lasts (winner and repairer both claim first).
CLAIM_SECONDS = 60
#: Claims a repairer tries, each after the previous claim expired, before giving up (its
#: member then goes back to the queue and tries again later).
CLAIM_ATTEMPTS = 3


# --------------------------------------------------------------------------- sending


async def send_chain(server: Server, chain: Chain) -> ChainAsyncResult:
    """Publish the first step (the rest travel nested in it) and return the chain's handle."""
    if not isinstance(chain, Chain):
        raise TypeError(f"send_chain needs a Chain, got {chain!r}")
    await server.asend_task(chain.signatures[0])
    return ChainAsyncResult(chain.task_uuids, server.backend)


async def send_group(
    server: Server, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
) -> list[AsyncResult]:
    """Write the group's metadata, then PENDING for every member, then publish them.

    At most ``send_concurrency`` messages are in flight at once (0: unlimited, published in
    batches). A publish error is raised once the other batches have finished; members
    already published still run.
    """
    if not isinstance(group, Group):
        raise TypeError(f"send_group needs a Group, got {group!r}")
    if send_concurrency < 0:
        raise ValueError(f"send_concurrency must be >= 0, got {send_concurrency}")
    members = group.signatures
    backend = server.backend
    for member in members:
        server.prepare(member)
    # Go ignores InitGroup's error; we do not, since a chord without metadata never fires.
    await backend.init_group(group.group_uuid, group.task_uuids)
    # Every PENDING is written before anything is published: a late PENDING would overwrite
    # the state of a member a fast worker has already finished.
    for start in range(0, len(members), PENDING_BATCH):
        await backend.set_pending(members[start : start + PENDING_BATCH])
    await _publish(server, members, send_concurrency, on_progress)
    return [AsyncResult(m.uuid, backend) for m in members]


async def send_chord(
    server: Server, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
) -> ChordAsyncResult:
    """Send the chord's group; a worker publishes the callback when the group is done."""
    if not isinstance(chord, Chord):
        raise TypeError(f"send_chord needs a Chord, got {chord!r}")
    if chord.callback.headers is None:
        chord.callback.headers = {}  # as Go's SendChord leaves it
    await send_group(server, chord.group, send_concurrency, on_progress)
    return ChordAsyncResult(chord.callback.uuid, chord.group.group_uuid, chord.group.task_uuids, server.backend)


async def _publish(
    server: Server, members: Sequence[Signature], send_concurrency: int, on_progress: ProgressHandler | None
) -> None:
    if server._pre_publish is not None:
        for member in members:
            server._pre_publish(member)
    if send_concurrency > 0:
        # n messages per round trip, one round trip at a time: never more than n in flight.
        size, parallel = send_concurrency, 1
    else:
        size, parallel = PUBLISH_BATCH, PUBLISH_PARALLEL
    batches = [members[i : i + size] for i in range(0, len(members), size)]
    slots = asyncio.Semaphore(parallel)
    published = 0

    async def publish(batch: Sequence[Signature]) -> None:
        nonlocal published
        async with slots:
            await server.broker.publish_many(batch)
        published += len(batch)
        if on_progress is not None:
            on_progress(published, len(members))

    outcomes = await asyncio.gather(*(publish(b) for b in batches), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        log.logger.error(
            "Publishing group %s: %d of %d batches failed (%d of %d members published)",
            members[0].group_uuid,
            len(errors),
            len(batches),
            published,
            len(members),
        )
        raise errors[0]


# --------------------------------------------------------------------------- worker side


async def was_completed(server: Server, signature: Signature) -> bool:
    """Whether a chord member arrives with a final state already stored (a redelivery).

    Read before the worker writes RECEIVED; only such a member may repair a lost callback.
    """
    if not signature.group_uuid or signature.chord_callback is None:
        return False
    state = await server.backend.aget_state(signature.uuid)
    return state is not None and state.is_completed()


async def complete_chord(server: Server, signature: Signature, redelivered: bool) -> None:
    """After a group member finished (either way): fire the chord if the group is done.

    Exactly one caller wins ``trigger_chord`` and decides: send the callback with the
    members' results in group order (unless the callback is immutable), or, if a member
    failed, record FAILURE for the callback and never send it.
    """
    callback = signature.chord_callback
    group_uuid = signature.group_uuid
    if not group_uuid or callback is None or signature.group_task_count <= 0:
        return  # (a count of 0 never completes in Go either: it compares with equality)
    backend = server.backend
    # The backend's own completion check: a cheap count on some backends (AMQP's group queue).
    if not await backend.group_completed(group_uuid, signature.group_task_count):
        return
    # One trigger per group per process is enough (see _triggering); a redelivered member
    # always asks itself, since it may be the one that has to repair a lost callback.
    single = not redelivered
    if single and not _start_trigger(group_uuid):
        return
    try:
        async with _trigger_slots():
            won = await backend.trigger_chord(group_uuid)
    finally:
        if single:
            _end_trigger(group_uuid)
    if not won:
        if not (redelivered and await _callback_lost(server, callback)):
            return
        log.logger.warning(
            "Chord %s was triggered but its callback %s was never sent (a worker stopped in between); sending it now",
            group_uuid,
            callback.uuid,
        )
    elif not await _claim(server, callback):
        log.logger.info("Callback %s of chord %s is being sent by a redelivered member", callback.uuid, group_uuid)
        return
    # Members in group order: the metadata's TaskUUIDs (for a Go chord on AMQP, which stores
    # none, the backend makes them up in completion order, Go's order there).
    meta = await backend.aget_group_meta(group_uuid)
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
        if not callback.immutable:  # the callback's own flag, for chords (WIRE.md 6.3 step 8)
            # As Go: any result type is passed on; one no task can take fails the callback.
            args.extend(Arg.from_wire(r.type, r.value) for r in state.results or ())
    if failure:
        log.logger.info("Not sending callback %s of chord %s: %s", callback.uuid, group_uuid, failure)
        # Never sent, so there is no PENDING to take the creation time from: it is now.
        decided = TaskState(callback.uuid, FAILURE, callback.name, error=failure, created_at=utcnow())
        await backend.write_states([decided], False)
        return
    callback.args = [*(callback.args or ()), *args]
    await server.asend_task(callback)


# Groups this process is triggering right now. Members of one group often finish together
# (their state writes share a round trip), and all of them then find the group complete;
# one trigger per process is enough, since only one caller can win anyway, and a trigger
# that fails leaves its own member to be redelivered and try again. This matters on Redis,
# where every trigger takes Go's single global TriggerChordMutex.
_triggering: set[str] = set()
_triggering_guard = threading.Lock()


def _start_trigger(group_uuid: str) -> bool:
    with _triggering_guard:
        if group_uuid in _triggering:
            return False
        _triggering.add(group_uuid)
        return True


def _end_trigger(group_uuid: str) -> None:
    with _triggering_guard:
        _triggering.discard(group_uuid)


# Triggers in flight per event loop. Many chords finishing at once would otherwise all poll
# Redis for Go's global TriggerChordMutex at the same time (only one caller in the cluster
# can hold it), exhausting the connection pool and stretching everyone's wait; waiting here
# costs nothing. Other backends' triggers are one quick atomic write, barely slowed.
TRIGGERS_IN_FLIGHT = 4
_trigger_semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _trigger_slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    with _triggering_guard:
        slots = _trigger_semaphores.get(loop)
        if slots is None:
            slots = _trigger_semaphores[loop] = asyncio.Semaphore(TRIGGERS_IN_FLIGHT)
    return slots


async def _callback_lost(server: Server, callback: Signature) -> bool:
    """True if this (redelivered) member should send a triggered chord's callback itself.

    It should when the callback has no stored state at all: whoever triggered the chord
    writes one (PENDING before publishing, or FAILURE) right after winning. The winner and
    a repairer both claim the callback before sending it (``_claim``), so that only one of
    them does even when the winner is merely slow; a short grace first lets a slow winner
    finish without a repair at all.
    """
    backend = server.backend
    if await backend.aget_state(callback.uuid) is not None:
        return False
    await asyncio.sleep(RECOVERY_GRACE)
    for _ in range(CLAIM_ATTEMPTS):
        if await backend.aget_state(callback.uuid) is not None:
            return False
        if await _claim(server, callback):
            return await backend.aget_state(callback.uuid) is None
        # Claimed by a winner that is sending it, or that died before it could: look again
        # once that claim has expired.
        await asyncio.sleep(CLAIM_SECONDS + 1)
    raise TimeoutError(f"chord callback {callback.uuid} stays claimed by someone who never sends it")


async def _claim(server: Server, callback: Signature) -> bool:
    """Take the right to send ``callback`` for ``CLAIM_SECONDS`` (the cluster-wide lock)."""
    key = "machinery_chord_callback_" + callback.uuid
    return await server.lock.lock(key, now_ns() + CLAIM_SECONDS * 1_000_000_000, retries=1)
