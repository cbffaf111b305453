"""Middleware: functions that wrap every handler call, and the ones natrio ships.

The contract is small: a handler call is ``await call(invocation)``, where
:class:`Invocation` is a frozen value holding the task and its context; a middleware
takes the next call and returns a new one::

    def middleware(call: Next) -> Next:
        async def wrapped(invocation: Invocation) -> object:
            ...  # before
            output = await call(invocation)
            ...  # after
            return output
        return wrapped

Pass them as ``Worker(nc, middleware=[outer, inner])`` or add them with
``worker.use(m)`` before the worker starts: the first in the list runs outermost. An
exception escaping a middleware (or a handler) is a failure of that task, recorded and
retried like any other; it never stops the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ._context import TaskContext
from ._errors import ConfigurationError, ExecutionPaused, HandlerTimeout
from ._model import Task

__all__ = ["Invocation", "Middleware", "Next", "log", "metrics", "timeout"]


@attrs.frozen
class Invocation:
    """One handler call: the task as delivered and the context the handler gets."""

    task: Task
    context: TaskContext


#: A handler call, as middleware sees it.
Next = Callable[[Invocation], Awaitable[Any]]
#: A middleware takes the next call and returns a wrapped one.
Middleware = Callable[[Next], Next]


def log(logger: logging.Logger | None = None) -> Middleware:
    """Log the start, end and errors of every execution.

    Records carry the task type, run id, step id, attempt and (at the end) the duration.
    """
    target = logger or logging.getLogger("natrio.task")

    def middleware(call: Next) -> Next:
        async def logged(invocation: Invocation) -> Any:
            task = invocation.task
            where = f"{task.task_type} {task.run_id}/{task.step_id} attempt {task.attempt}"
            target.info("start %s", where)
            began = trio.current_time()
            try:
                output = await call(invocation)
            except BaseException as exc:
                expected = isinstance(exc, trio.Cancelled | ExecutionPaused)
                level = logging.INFO if expected else logging.ERROR
                target.log(
                    level, "error %s after %.3f s: %r", where, trio.current_time() - began, exc
                )
                raise
            target.info("end %s in %.3f s", where, trio.current_time() - began)
            return output

        return logged

    return middleware


#: What :func:`metrics` calls once per execution with the invocation, outcome and seconds.
Observer = Callable[[Invocation, str, float], None]


def metrics(observer: Observer) -> Middleware:
    """Call ``observer(invocation, outcome, duration)`` exactly once per execution.

    ``outcome`` is ``"ok"`` when the handler returned, ``"error"`` when it raised,
    ``"paused"`` when it paused and ``"cancelled"`` when it was cancelled (shutdown,
    deadline, timeout). An observer that raises is logged, not allowed to fail the task.
    """

    def middleware(call: Next) -> Next:
        async def measured(invocation: Invocation) -> Any:
            began = trio.current_time()
            outcome = "error"
            try:
                output = await call(invocation)
                outcome = "ok"
                return output
            except trio.Cancelled:
                outcome = "cancelled"
                raise
            except ExecutionPaused:
                outcome = "paused"
                raise
            finally:
                try:
                    observer(invocation, outcome, trio.current_time() - began)
                except Exception:
                    logging.getLogger("natrio.middleware").exception("metrics observer failed")

        return measured

    return middleware


def timeout(seconds: float) -> Middleware:
    """Fail an execution that runs longer than ``seconds`` (kind ``timeout``, retryable)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ConfigurationError(f"timeout must be a number > 0, got {seconds!r}")

    def middleware(call: Next) -> Next:
        async def bounded(invocation: Invocation) -> Any:
            with trio.move_on_after(seconds) as scope:
                return await call(invocation)
            if scope.cancelled_caught:
                raise HandlerTimeout(f"the handler did not finish within {seconds} s")
            return None  # pragma: no cover - the body always returns or raises

        return bounded

    return middleware
