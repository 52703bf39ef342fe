"""Result backends record every task state; ``base.Backend`` is the seam."""

from .base import Backend

__all__ = ["Backend"]
