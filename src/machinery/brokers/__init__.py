"""Brokers: where task messages wait. ``base.Broker`` and ``base.Consumer`` are the seam."""

from __future__ import annotations

from ..config import Config
from ..factory import driver_class
from .base import Broker, Consumer, DeadLetter, Delivery

__all__ = ["Broker", "Consumer", "DeadLetter", "Delivery", "create_broker"]


def create_broker(config: Config) -> Broker:
    """The broker serving ``config.broker`` (its first URL picks the driver)."""
    broker: Broker = driver_class("broker", config.broker_urls()[0])(config, config.broker)
    return broker
