"""Cluster-wide locks for periodic work; ``base.Lock`` is the seam."""

from __future__ import annotations

from ..config import Config
from ..factory import driver_class
from .base import Lock

__all__ = ["Lock", "create_lock"]


def create_lock(config: Config) -> Lock:
    """The lock serving ``config.lock`` (default: the result backend's URL; as in Go, a URL no
    lock serves falls back to the in-process lock)."""
    url = config.lock_url
    lock: Lock = driver_class("lock", url)(config, url)
    return lock
