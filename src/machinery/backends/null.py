"""The results-off backend, Go's ``null`` (``result_backend="null"`` or ``"null://"``).

For fire-and-forget work: no state is written anywhere, so a send costs only the publish and a
task only its message's take and ack. Nothing can be read back: ``get()``, ``state()`` and
waiting raise ``ResultsDisabledError`` at once rather than wait for a state that never comes.
Groups are sent as usual (their members run); chords need the members' states, so sending
one is refused. Delivery stays at-least-once: that is the broker's, not the backend's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ResultsDisabledError
from ..state import GroupMeta, TaskState
from .base import Backend


class NullBackend(Backend):
    """Stores nothing; every read says results are off."""

    idle_loop_ok = True  # nothing to keep up between calls

    stores_results = False
    writes_batches_atomically = True

    def _disabled(self, what: str) -> ResultsDisabledError:
        return ResultsDisabledError(
            f"{what}: the result backend is {self.url!r}, which stores no task states; "
            "set result_backend to a real store (redis://, sqlite://, amqp://...) to read results"
        )

    async def write_states(self, states: Sequence[TaskState], keep_created: bool) -> None:
        return None

    async def get_state(self, task_uuid: str) -> TaskState | None:
        raise self._disabled(f"cannot read the state of {task_uuid}")

    async def await_state(self, task_uuid: str, timeout: float | None, missing_grace: float | None = None) -> TaskState:
        raise self._disabled(f"cannot wait for the result of {task_uuid}")

    async def write_group_meta(self, meta: GroupMeta) -> None:
        return None  # as Go's null InitGroup: the group is sent, nothing is kept

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        raise self._disabled(f"cannot read group {group_uuid}")

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        raise self._disabled("cannot read task states")

    async def trigger_chord(self, group_uuid: str, task_count: int) -> bool:
        raise self._disabled(f"cannot complete the chord of group {group_uuid}")

    async def purge_state(self, task_uuid: str) -> None:
        return None

    async def purge_group_meta(self, group_uuid: str) -> None:
        return None


__all__ = ["NullBackend"]
