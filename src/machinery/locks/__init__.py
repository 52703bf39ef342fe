"""Cluster-wide locks for periodic work; ``base.Lock`` is the seam."""

from .base import Lock

__all__ = ["Lock"]
