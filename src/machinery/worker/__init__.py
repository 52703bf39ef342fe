"""The worker: ``Worker`` takes messages and runs them (``worker.worker``); what happens to each
message is ``processing``; ``def`` tasks run on ``threads``."""

from .processing import MessageHandler, decode_message, error_text
from .threads import TaskThreads
from .worker import Worker, WorkerHost

__all__ = ["MessageHandler", "TaskThreads", "Worker", "WorkerHost", "decode_message", "error_text"]
