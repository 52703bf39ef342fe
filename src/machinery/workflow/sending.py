"""Sending chains, groups and chords (docs/wire.md §8), as Go's ``SendChain``, ``SendGroup`` and
``SendChord`` do, through the one send path (``dispatch.Dispatcher``)."""

from __future__ import annotations

from ..dispatch import Dispatcher, ProgressHandler
from ..errors import UnsupportedOperation
from ..result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from ..signature import Chain, Chord, Group


async def send_chain(dispatcher: Dispatcher, chain: Chain) -> ChainAsyncResult:
    """Publish the first step (the rest travel nested in it) and return the chain's handle."""
    if not isinstance(chain, Chain):
        raise TypeError(f"send_chain needs a Chain, got {chain!r}")
    await dispatcher.send(chain.signatures[0])
    return ChainAsyncResult(chain.task_uuids, dispatcher.backend)


async def send_group(
    dispatcher: Dispatcher, group: Group, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
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
    backend = dispatcher.backend
    # Go ignores InitGroup's error; we do not, since a chord without metadata never fires.
    await backend.init_group(group.group_uuid, group.task_uuids)
    await dispatcher.send_batch(group.signatures, send_concurrency, on_progress)
    return [AsyncResult(m.uuid, backend) for m in group.signatures]


async def send_chord(
    dispatcher: Dispatcher, chord: Chord, send_concurrency: int = 0, on_progress: ProgressHandler | None = None
) -> ChordAsyncResult:
    """Send the chord's group; a worker publishes the callback when the group is done."""
    if not isinstance(chord, Chord):
        raise TypeError(f"send_chord needs a Chord, got {chord!r}")
    if not dispatcher.backend.stores_results:
        raise UnsupportedOperation(
            f"a chord needs its members' states, and the result backend {dispatcher.backend.url!r} stores none; "
            "set result_backend to a real store to send chords"
        )
    if chord.callback.headers is None:
        chord.callback.headers = {}  # as Go's SendChord leaves it
    await send_group(dispatcher, chord.group, send_concurrency, on_progress)
    return ChordAsyncResult(chord.callback.uuid, chord.group.group_uuid, chord.group.task_uuids, dispatcher.backend)
