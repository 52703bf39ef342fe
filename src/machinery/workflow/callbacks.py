"""``on_success`` and ``on_error`` callbacks, as Go's worker sends them (docs/wire.md §6.3, §6.4).

A chain travels as nested ``on_success`` callbacks (§8.1), so this is also what runs chains.
"""

from __future__ import annotations

from .._backoff import persist
from ..dispatch import Dispatcher
from ..errors import TaskRevoked
from ..middleware import HookResult, Middleware, Outcome
from ..signature import Signature
from ..state import FAILURE, SUCCESS
from ..types import Arg


class Callbacks(Middleware):
    """Sends a finished task's callbacks once its final state is stored."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def after_process(self, signature: Signature, outcome: Outcome) -> HookResult:
        if outcome.state == SUCCESS and signature.on_success:
            return self._send_on_success(signature, outcome)
        if outcome.state == FAILURE and signature.on_error and not isinstance(outcome.exception, TaskRevoked):
            return self._send_on_error(signature, outcome.error)  # (a revoked task was cancelled on purpose)
        return None

    async def _send_on_success(self, signature: Signature, outcome: Outcome) -> None:
        for callback in signature.on_success or ():
            # Go consults the *finished* task's flag, not the callback's (§6.3).
            if not signature.immutable:
                passed = [Arg.from_wire(r.type, r.value) for r in outcome.task_results]
                callback.args = [*(callback.args or ()), *passed]
            await self._send(callback, signature)

    async def _send_on_error(self, signature: Signature, error: str) -> None:
        for callback in signature.on_error or ():
            callback.args = [Arg("string", error), *(callback.args or ())]
            await self._send(callback, signature)

    async def _send(self, callback: Signature, parent: Signature) -> None:
        await persist(
            lambda: self._dispatcher.send(callback), f"sending callback {callback.name} of {parent.name} {parent.uuid}"
        )
