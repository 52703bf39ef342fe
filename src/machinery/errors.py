"""The exceptions machinery raises; each names what went wrong and what to do."""

from __future__ import annotations


class MachineryError(Exception):
    """Base class of every error raised by machinery."""


class ConfigError(MachineryError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class ArgumentError(MachineryError, ValueError):
    """A task argument cannot be converted to the type the task declares."""


class ResultTypeError(MachineryError, TypeError):
    """A task returned a value that has no Go type and cannot be written as a result."""


class MessageDecodeError(MachineryError, ValueError):
    """A broker message is not a valid task message."""


class TaskNotRegisteredError(MachineryError, KeyError):
    """A task name is not registered with the server."""


class TaskFailed(MachineryError):
    """The task ended in FAILURE; ``error`` holds the error text the worker stored."""

    def __init__(self, task_uuid: str, error: str) -> None:
        super().__init__(f"task {task_uuid} failed: {error}")
        self.task_uuid = task_uuid
        self.error = error


class BrokerConnectionError(MachineryError, ConnectionError):
    """The broker or result backend cannot be reached."""


class ReplicationError(BrokerConnectionError):
    """Redis took a write but too few replicas confirmed it in time (``RedisConfig.min_replicas_acked``):
    a failover now could lose it, so it counts as not done and is retried."""


class UnsupportedOperation(MachineryError, NotImplementedError):
    """The broker or backend cannot answer this honestly (e.g. listing delayed tasks on
    RabbitMQ); the message says why. Never a wrong answer instead."""


class ResultsDisabledError(UnsupportedOperation):
    """The result backend is ``null``: no task state is stored, so there is none to read or
    wait for. Configure a real ``result_backend`` to read results."""


class TaskNotFoundError(MachineryError, LookupError):
    """No state was ever stored for this task UUID: it was never sent to this result backend,
    or its result expired (results live ``results_expire_in`` seconds)."""

    def __init__(self, task_uuid: str, message: str) -> None:
        super().__init__(message)
        self.task_uuid = task_uuid


class ResultConsumedError(MachineryError):
    """The task's states were taken by another reader (on RabbitMQ a Go ``AsyncResult`` reads
    the state queue destructively and deletes it once it has seen the final state)."""

    def __init__(self, task_uuid: str, message: str) -> None:
        super().__init__(message)
        self.task_uuid = task_uuid


class SoftTimeLimitExceeded(MachineryError):
    """Raised inside a task that ran past its soft time limit: catch it to clean up. The task
    then has until its hard limit (``time_limit``) before it is stopped."""


class TimeLimitExceeded(MachineryError):
    """The task ran past its hard time limit and was stopped (its stored error says so)."""

    def __init__(self, seconds: float, detail: str = "") -> None:
        super().__init__(f"time limit of {seconds:g} s exceeded{detail}")
        self.seconds = seconds


class TaskRevoked(MachineryError):
    """The task was revoked (``server.revoke``): it was skipped, or stopped while it ran."""

    def __init__(self) -> None:
        super().__init__("revoked")


class WorkerProcessDied(MachineryError):
    """The pool process running a task died (a crash, an OOM kill); the task failed with it."""


class MissingExtra(MachineryError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the
    ``pip install 'machinery[...]'`` that brings it."""
