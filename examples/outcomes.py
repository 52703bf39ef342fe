"""A middleware that counts the tasks a worker processed by outcome (the README's example)."""

from collections import Counter

from machinery import Middleware, Outcome, Signature


class CountOutcomes(Middleware):
    """Counts ``SUCCESS``, ``FAILURE`` and ``RETRY`` per task name, and messages dead-lettered."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.dead_letters = 0

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        self.counts[signature.name, outcome.state] += 1

    def after_dead_letter(self, body: bytes, reason: str) -> None:
        self.dead_letters += 1
