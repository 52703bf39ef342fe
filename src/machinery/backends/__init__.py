"""Result backends record every task state; ``base.Backend`` is the seam."""

from __future__ import annotations

from ..config import Config
from ..factory import driver_class
from .base import Backend

__all__ = ["Backend", "create_backend"]


def create_backend(config: Config) -> Backend:
    """The result backend serving ``config.result_backend`` (default: the broker's URL)."""
    url = config.result_backend_url
    backend: Backend = driver_class("result_backend", url)(config, url)
    return backend
