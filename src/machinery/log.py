"""The ``machinery`` logger, which applications may swap for their own."""

from __future__ import annotations

import logging

logger: logging.Logger = logging.getLogger("machinery")


def set_logger(new_logger: logging.Logger) -> None:
    """Send machinery's log records to ``new_logger`` instead of the ``machinery`` logger."""
    global logger
    logger = new_logger


def get_logger() -> logging.Logger:
    """Return the logger machinery currently writes to."""
    return logger
