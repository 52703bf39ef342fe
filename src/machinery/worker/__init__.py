"""The worker: ``Worker`` takes messages and runs them (``worker.worker``); what happens to each
message is ``processing``; a task runs under its limits in ``execution``, its ``def`` body on
``threads`` or in the child processes of ``pool``."""

from .processing import MessageHandler, decode_message, error_text
from .threads import TaskThreads
from .worker import POOLS, Worker, WorkerHost

__all__ = ["POOLS", "MessageHandler", "TaskThreads", "Worker", "WorkerHost", "decode_message", "error_text"]
