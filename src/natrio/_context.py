"""TaskContext: what a handler sees of its task, and the terminal methods that end an execution."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import ConfigurationError, TerminalAlreadyCalled
from ._outcomes import Task

if TYPE_CHECKING:
    from ._retry import RetryPolicy


class Finisher(Protocol):
    """What carries out a context's terminal calls (the dispatcher)."""

    async def complete(self, ctx: TaskContext, output: object) -> None: ...

    async def fail(
        self, ctx: TaskContext, exc: BaseException, *, permanent: bool, delay: float | None
    ) -> None: ...

    def heartbeat(self, ctx: TaskContext) -> None: ...


class TaskContext:
    """The handler's view of one execution of one task.

    Identity and input: :attr:`input`, :attr:`task_type`, :attr:`group`, :attr:`run_id`,
    :attr:`step_id`, :attr:`attempt` (1-based), :attr:`retry_count` (0-based),
    :attr:`headers`, :attr:`worker_id`, :attr:`logger`.

    Exactly one terminal call per execution: :meth:`complete`, :meth:`fail`,
    :meth:`fail_permanent` or :meth:`fail_retry_after`; a second raises
    :class:`TerminalAlreadyCalled`. A handler that returns without one completes with its
    return value; one that raises fails with the exception. Terminal calls take effect at
    once (the outcome is durable and the task acked when they return) and are not
    interrupted by cancellation.
    """

    def __init__(
        self,
        task: Task,
        finisher: Finisher,
        *,
        worker_id: str,
        policy: RetryPolicy,
        logger: logging.Logger,
    ) -> None:
        self.task = task
        self.worker_id = worker_id
        self.policy = policy
        self._base_logger = logger
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._finisher = finisher
        self._finished = False

    # -- identity ---------------------------------------------------------------------

    @property
    def input(self) -> bytes:
        """The task's input payload, as submitted."""
        return self.task.input

    @property
    def task_type(self) -> str:
        """The task type this handler was registered for."""
        return self.task.task_type

    @property
    def group(self) -> str:
        """The worker group the task was submitted to."""
        return self.task.group

    @property
    def run_id(self) -> str:
        """The run this step belongs to."""
        return self.task.run_id

    @property
    def step_id(self) -> str:
        """The step within the run."""
        return self.task.step_id

    @property
    def attempt(self) -> int:
        """This attempt's number, starting at 1."""
        return self.task.attempt

    @property
    def retry_count(self) -> int:
        """How many attempts came before this one (0-based)."""
        return self.task.attempt - 1

    @property
    def headers(self) -> Mapping[str, str]:
        """The task message's headers, natrio's own included."""
        return self.task.headers

    @property
    def deadline(self) -> float | None:
        """The task's deadline as a Unix time, if it was submitted with one."""
        return self.task.deadline

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose records carry task_type, run_id, step_id and attempt as extras."""
        if self._logger is None:
            # Made on first use: most handlers never log, and this is the per-task hot path.
            self._logger = logging.LoggerAdapter(
                self._base_logger,
                {
                    "task_type": self.task.task_type,
                    "run_id": self.task.run_id,
                    "step_id": self.task.step_id,
                    "attempt": self.task.attempt,
                },
            )
        return self._logger

    @property
    def finished(self) -> bool:
        """Whether this execution already has its outcome."""
        return self._finished

    # -- terminal methods -------------------------------------------------------------

    def _claim(self, method: str) -> None:
        if self._finished:
            raise TerminalAlreadyCalled(
                f"{method}() called, but this execution of {self.task_type} "
                f"{self.run_id}/{self.step_id} already has its outcome"
            )
        self._finished = True

    async def complete(self, output: Any = None) -> None:
        """Finish successfully with ``output`` (bytes, None, or a value cattrs can unstructure)."""
        self._claim("complete")
        await self._finisher.complete(self, output)

    async def fail(self, exc: BaseException) -> None:
        """Fail this attempt; the retry policy decides whether and when to try again."""
        self._claim("fail")
        await self._finisher.fail(self, exc, permanent=False, delay=None)

    async def fail_permanent(self, exc: BaseException) -> None:
        """Fail without retrying: the task is dead-lettered now."""
        self._claim("fail_permanent")
        await self._finisher.fail(self, exc, permanent=True, delay=None)

    async def fail_retry_after(self, exc: BaseException, delay: float) -> None:
        """Fail this attempt and retry after exactly ``delay`` seconds (attempts still count)."""
        if not delay >= 0:
            raise ConfigurationError(f"fail_retry_after delay must be >= 0, got {delay!r}")
        self._claim("fail_retry_after")
        await self._finisher.fail(self, exc, permanent=False, delay=delay)

    async def heartbeat(self) -> None:
        """Tell the server the task is still being worked on (``+WPI``), resetting AckWait.

        natrio already does this every ack_wait/3 for running handlers; call it yourself
        only to be explicit.
        """
        self._finisher.heartbeat(self)

    def __repr__(self) -> str:
        return (
            f"<TaskContext {self.task_type} {self.run_id}/{self.step_id} "
            f"attempt={self.attempt}{' finished' if self._finished else ''}>"
        )
