"""TaskContext: what a handler sees of its task, and the terminal methods that end an execution."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from . import _wire as wire
from ._codec import decode, encode
from ._errors import ConfigurationError, ExecutionPaused, TerminalAlreadyCalled
from ._model import Task

MAX_SIGNAL_WAIT = 3600.0

if TYPE_CHECKING:
    from ._retry import RetryPolicy
    from ._state import StepState


class Finisher(Protocol):
    """What carries out a context's terminal calls and durable state (the dispatcher)."""

    state: StepState

    async def complete(self, ctx: TaskContext, output: object) -> None: ...

    async def fail(
        self, ctx: TaskContext, exc: BaseException, *, permanent: bool, delay: float | None
    ) -> None: ...

    async def pause(self, ctx: TaskContext, delay: float) -> None: ...

    async def continue_with(self, ctx: TaskContext, output: object) -> None: ...

    def heartbeat(self, ctx: TaskContext) -> None: ...

    def put_stream(self, ctx: TaskContext, data: bytes) -> None: ...


def _finite_delay(delay: object) -> bool:
    return isinstance(delay, int | float) and not isinstance(delay, bool) and 0 <= delay < math.inf


class TaskContext:
    """The handler's view of one execution of one task.

    Identity and input: :attr:`input`, :attr:`task_type`, :attr:`group`, :attr:`run_id`,
    :attr:`step_id`, :attr:`attempt` (1-based), :attr:`retry_count` (0-based),
    :attr:`iteration`, :attr:`resumed`, :attr:`headers`, ``worker_id``, :attr:`logger`.

    Durable state: :meth:`checkpoint`, :meth:`load_checkpoint`, :meth:`pause`,
    :meth:`wait_for_signal`, :meth:`send_signal`; output as it happens:
    :meth:`put_stream`.

    Exactly one terminal call per execution: :meth:`complete`, :meth:`fail`,
    :meth:`fail_permanent`, :meth:`fail_retry_after`, :meth:`continue_with` or
    :meth:`pause`; a second raises
    :class:`TerminalAlreadyCalled`. A handler that returns without one completes with its
    return value; one that raises fails with the exception. Terminal calls take effect at
    once (when they return the outcome is recorded and the task's ack, NAK or TERM is
    queued) and are not interrupted by cancellation.
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
        # Whether this execution touched durable state, so the end of the step clears it.
        self.used_state = False

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
    def iteration(self) -> int:
        """The agent-loop iteration, from 1; :meth:`continue_with` makes the next one."""
        return self.task.iteration

    @property
    def resumed(self) -> bool:
        """Whether this is the first delivery after a :meth:`pause` (false after that)."""
        return self.task.resumed

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
        if not _finite_delay(delay):
            raise ConfigurationError(
                f"fail_retry_after delay must be a finite number >= 0, got {delay!r}"
            )
        self._claim("fail_retry_after")
        await self._finisher.fail(self, exc, permanent=False, delay=delay)

    async def continue_with(self, output: Any) -> None:
        """End this iteration of an agent loop: run the step again with ``output`` as input.

        The next execution sees ``ctx.iteration`` one higher. The re-enqueue happens once
        even if this execution is redelivered; a ``continued`` event is published. Called
        in iteration ``max_iterations`` (a handler option, default 100), it dead-letters
        the step instead (kind ``iterations``).
        """
        self._claim("continue_with")
        await self._finisher.continue_with(self, output)

    async def pause(self, delay: float, checkpoint: Any = None) -> NoReturn:
        """Save ``checkpoint`` (if given), and end this execution; resume after ``delay`` s.

        Does not return: it raises :class:`natrio.ExecutionPaused`, which the worker handles. A
        pause does not use up the retry budget (``attempt`` after the resume is what it
        was), and the resumed execution has ``ctx.resumed`` true. A ``paused`` event is
        published.
        """
        if not _finite_delay(delay):
            raise ConfigurationError(f"pause delay must be a finite number >= 0, got {delay!r}")
        if self._finished:
            self._claim("pause")  # raises before anything is saved
        if checkpoint is not None:
            await self.checkpoint(checkpoint)
        self._claim("pause")
        self.used_state = True
        await self._finisher.pause(self, delay)
        raise ExecutionPaused(delay)

    # -- durable state ----------------------------------------------------------------

    async def checkpoint(self, state: Any) -> None:
        """Save ``state`` (bytes, or a value cattrs can unstructure) as the step's checkpoint.

        It survives redelivery, a crash and a move to another worker, and is removed when
        the step reaches a terminal outcome (unless the handler keeps checkpoints).
        """
        self.used_state = True
        await self._finisher.state.save_checkpoint(self.run_id, self.step_id, encode(state))

    async def load_checkpoint(self, state_type: Any = None) -> Any:
        """The step's last checkpoint (decoded into ``state_type`` if given), or None."""
        self.used_state = True
        raw = await self._finisher.state.load_checkpoint(self.run_id, self.step_id)
        if raw is None:
            return None
        return decode(raw, state_type)

    # The timeout is part of the contract (at most an hour, SignalTimeout a task failure),
    # not a stand-in for a cancel scope.
    async def wait_for_signal(self, name: str, timeout: float) -> bytes:  # noqa: ASYNC109
        """Wait for the run's signal ``name`` and return its data.

        A signal sent before the wait began is seen; signals are not consumed, so a later
        wait for the same name returns the stored data at once. The task is kept alive
        while waiting. Raises :class:`natrio.SignalTimeout` after ``timeout`` seconds (at most
        one hour; a longer timeout raises ConfigurationError), which fails the attempt
        (retryably) unless caught.
        """
        wire.check_name("signal name", name)
        if not 0 < timeout <= MAX_SIGNAL_WAIT:
            raise ConfigurationError(
                f"wait_for_signal timeout must be > 0 and at most {MAX_SIGNAL_WAIT:.0f} s, got {timeout!r}"
            )
        return await self._finisher.state.wait_for_signal(self.run_id, name, timeout)

    async def send_signal(self, run_id: str, name: str, data: Any = b"") -> None:
        """Send signal ``name`` with ``data`` to run ``run_id`` (bytes or a JSON-able value)."""
        wire.check_id("run id", run_id)
        wire.check_name("signal name", name)
        await self._finisher.state.send_signal(run_id, name, encode(data))

    async def put_stream(self, data: Any) -> None:
        """Publish ``data`` on the step's stream (core NATS: fire-and-forget, in order).

        Read it with ``Client.stream(run_id, step_id)`` or ``natrio stream RUN STEP``.
        """
        self._finisher.put_stream(self, encode(data))

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
