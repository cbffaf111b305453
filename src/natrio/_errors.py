"""Every exception natrio raises, under one root, :class:`NatrioError` (and
:class:`ExecutionPaused`, which is a signal, not an error). Imports nothing of natrio:
this module is the bottom of the import graph."""

from __future__ import annotations

import math
from typing import Protocol


class FailureRecord(Protocol):
    """What :class:`TaskFailed` carries: a :class:`natrio.TaskError`."""

    @property
    def type(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def traceback(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def attempts(self) -> int: ...


class NatrioError(Exception):
    """Root of every exception natrio raises on its own account."""


class ConfigurationError(NatrioError, ValueError):
    """An invalid name, option or registration.

    Raised at construction or registration time (``Worker(...)``, ``worker.handle(...)``,
    ``Client.submit(...)``, ``RetryPolicy(...)``), never at first use.
    """


class ConnectError(NatrioError, ConnectionError):
    """Raised by :func:`natrio.connect` when no connection could be made in time.

    The message names the URL (without credentials) and the last error seen.
    """


class ConnectionClosed(NatrioError):
    """Raised by a connection's methods once the connection has been closed."""


class RequestTimeout(NatrioError, TimeoutError):
    """Raised when the NATS server did not answer a request in time."""


class NoResponders(NatrioError):
    """Raised when a request found nobody listening: for JetStream, no stream holds the subject."""


class JetStreamError(NatrioError):
    """Raised when the JetStream API answers with an error.

    ``code`` is the HTTP-like status, ``err_code`` the JetStream error number
    (for example 10059 for "stream not found"), ``description`` the server's text.
    """

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"JetStream error {code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class PayloadTooLarge(NatrioError, ValueError):
    """Raised by ``publish`` and ``Client.submit`` when a payload exceeds the server's max_payload."""


class ServerError(NatrioError):
    """Raised by :func:`natrio.embedded_server` when nats-server cannot be found or started."""


class TerminalAlreadyCalled(NatrioError, RuntimeError):
    """Raised by a TaskContext terminal method when this execution already has its outcome."""


class Fatal(NatrioError):
    """Raise from a handler to fail the task permanently, skipping any retries.

    ``Fatal("message")`` records the message; ``Fatal(exc)`` records the wrapped
    exception's type and message instead.
    """

    def __init__(self, reason: str | BaseException = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Retryable(NatrioError):
    """Raise from a handler to fail this attempt and retry after ``delay`` seconds.

    Without ``delay`` the retry policy decides. Attempts are still counted: when the
    policy's ``maximum_attempts`` is reached the task is dead-lettered.
    """

    def __init__(self, reason: str | BaseException = "", *, delay: float | None = None) -> None:
        super().__init__(reason)
        if delay is not None and not (isinstance(delay, int | float) and 0 <= delay < math.inf):
            raise ConfigurationError(f"Retryable delay must be finite and >= 0, got {delay!r}")
        self.reason = reason
        self.delay = delay


class TaskFailed(NatrioError):
    """Raised by ``TaskHandle.result()`` when the task ended as a dead letter.

    ``error`` is the :class:`TaskError` recorded in the dead-letter entry.
    """

    def __init__(self, task_type: str, run_id: str, step_id: str, error: FailureRecord) -> None:
        super().__init__(
            f"task {task_type} {run_id}/{step_id} failed ({error.kind}) after "
            f"{error.attempts} attempt(s): {error.type}: {error.message}"
        )
        self.task_type = task_type
        self.run_id = run_id
        self.step_id = step_id
        self.error = error


class HandlerTimeout(NatrioError):
    """The failure recorded when a handler runs past its ``timeout`` (kind ``timeout``).

    Retryable, like any failure, within the retry policy.
    """


class DecodeError(NatrioError, ValueError):
    """A payload could not be turned into the requested type; the message names the field."""


class SignalTimeout(NatrioError):
    """Raised by ``ctx.wait_for_signal`` when no signal came in time.

    Unless the handler catches it, it is an ordinary (retryable) failure of the attempt.
    """


class MalformedTask(NatrioError):
    """A message on a task subject that is not a valid task; the message says why.

    Never raised to users: such a message is dead-lettered (kind ``malformed``).
    """


class ConsumerGone(NatrioError):
    """The server reported a consumer deleted (409) or rejected its pulls (400)."""


class ExecutionPaused(BaseException):
    """Raised by ``ctx.pause()`` to end the execution; the worker catches it.

    A BaseException, like ``trio.Cancelled``, so that ``except Exception`` in a handler
    does not swallow it; ``finally`` blocks still run.
    """


class SupervisorError(NatrioError):
    """``natrio worker --processes N`` gave up on its worker processes, or could not stop
    them cleanly; the message says which process and why."""


class BenchError(NatrioError):
    """``natrio bench`` could not measure something; the message says what and why."""


class ContestantFailed(BenchError):
    """A bench contestant process failed: the message names it and quotes its stderr's end."""
