"""natrio: a Trio-native worker runtime for NATS JetStream.

Everything public is exported here; the ``_modules`` behind it follow the way a task
travels: ``_transport`` (the connection) → ``_consumer`` (continuous pull) → ``_dispatch``
(the wire edge, the runners, one settlement per delivery, the outcome policy) →
``_context`` (what a handler sees) → ``_outcomes`` (events, replies, dead letters), with
``_worker``, ``_client``, ``_provision``, ``_directory``, ``_server`` and ``_cli`` beside
them; ``_errors`` and ``_model`` (data records) are at the bottom.
"""

from ._client import Client, StepStream, TaskHandle
from ._codec import converter
from ._context import TaskContext
from ._dead_letters import DeadLetterReader
from ._directory import list_workers
from ._dispatch import DispatcherStatistics, StepHooks
from ._dispatch.tally import TaskTypeStatistics
from ._errors import (
    ConfigurationError,
    ConnectError,
    ConnectionClosed,
    DecodeError,
    ExecutionPaused,
    Fatal,
    HandlerTimeout,
    JetStreamError,
    NatrioError,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
    Retryable,
    ServerError,
    SignalTimeout,
    TaskFailed,
    TerminalAlreadyCalled,
)
from ._history import RunEvent, RunHistory
from ._model import DeadLetter, Task, TaskError, WorkerInfo
from ._overview import EventRates, Overview, QueueStatistics
from ._provision import provision
from ._retry import RetryPolicy
from ._routing.limits import RateLimit
from ._routing.placement import worker_target
from ._schedules import Schedule
from ._server import EmbeddedServer, connect_or_embed, embedded_server, find_nats_server
from ._transport import Connection, Message, Subscription, connect
from ._version import __version__
from ._worker import Worker, WorkerStatistics, open_worker, run_worker

__all__ = [
    "Client",
    "ConfigurationError",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "DeadLetter",
    "DeadLetterReader",
    "DecodeError",
    "DispatcherStatistics",
    "EmbeddedServer",
    "EventRates",
    "ExecutionPaused",
    "Fatal",
    "HandlerTimeout",
    "JetStreamError",
    "Message",
    "NatrioError",
    "NoResponders",
    "Overview",
    "PayloadTooLarge",
    "QueueStatistics",
    "RateLimit",
    "RequestTimeout",
    "RetryPolicy",
    "Retryable",
    "RunEvent",
    "RunHistory",
    "Schedule",
    "ServerError",
    "SignalTimeout",
    "StepHooks",
    "StepStream",
    "Subscription",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskHandle",
    "TaskTypeStatistics",
    "TerminalAlreadyCalled",
    "Worker",
    "WorkerInfo",
    "WorkerStatistics",
    "__version__",
    "connect",
    "connect_or_embed",
    "converter",
    "embedded_server",
    "find_nats_server",
    "list_workers",
    "open_worker",
    "provision",
    "run_worker",
    "worker_target",
]
