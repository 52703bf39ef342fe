"""Brokers carry task messages from senders to workers; ``base.Broker`` is the seam."""

from .base import Broker, Consumer, DeadLetter, Delivery

__all__ = ["Broker", "Consumer", "DeadLetter", "Delivery"]
