"""machinery: a distributed task queue for Python, wire-compatible with Go Machinery."""

from .config import AMQPConfig, Config, DynamoDBConfig, GCPPubSubConfig, MongoDBConfig, RedisConfig, SQSConfig
from .errors import (
    ArgumentError,
    BrokerConnectionError,
    ConfigError,
    MachineryError,
    MessageDecodeError,
    ResultConsumedError,
    ResultsDisabledError,
    ResultTypeError,
    SoftTimeLimitExceeded,
    TaskFailed,
    TaskNotFoundError,
    TaskNotRegisteredError,
    TaskRevoked,
    TimeLimitExceeded,
    UnsupportedOperation,
    WorkerProcessDied,
)
from .log import get_logger, set_logger
from .middleware import Middleware, Outcome
from .registry import TaskContext
from .result import AsyncResult, ChainAsyncResult, ChordAsyncResult
from .retry import RetryTaskLater
from .server import Server, Task
from .signature import Chain, Chord, Group, Signature
from .state import FAILURE, PENDING, RECEIVED, RETRY, STARTED, SUCCESS, GroupMeta, TaskState
from .types import Arg, TaskResult
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AMQPConfig",
    "Arg",
    "ArgumentError",
    "AsyncResult",
    "BrokerConnectionError",
    "Chain",
    "ChainAsyncResult",
    "Chord",
    "ChordAsyncResult",
    "Config",
    "ConfigError",
    "DynamoDBConfig",
    "FAILURE",
    "GCPPubSubConfig",
    "Group",
    "GroupMeta",
    "MachineryError",
    "MessageDecodeError",
    "Middleware",
    "MongoDBConfig",
    "Outcome",
    "PENDING",
    "RECEIVED",
    "RETRY",
    "RedisConfig",
    "ResultConsumedError",
    "ResultTypeError",
    "ResultsDisabledError",
    "RetryTaskLater",
    "SQSConfig",
    "STARTED",
    "SUCCESS",
    "Server",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskNotFoundError",
    "TaskNotRegisteredError",
    "TaskResult",
    "TaskRevoked",
    "TaskState",
    "TimeLimitExceeded",
    "UnsupportedOperation",
    "Worker",
    "WorkerProcessDied",
    "get_logger",
    "set_logger",
]
