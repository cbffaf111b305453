"""One execution of a delivered task: the wire edge, redelivery checks, the context, the
middleware chain around the handler under the runner's cancel scope, and what it ended with."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from .. import _wire as wire
from .._context import TaskContext
from .._errors import (
    ExecutionPaused,
    HandlerTimeout,
    JetStreamError,
    MalformedTask,
    NatrioError,
    PayloadTooLarge,
)
from .._jetstream import JetStream
from .._model import Task
from .._retry import RetryPolicy
from .._routing.limits import ClusterLimiter, WorkerLimiter
from .._routing.placement import partition_of
from ..middleware import Invocation, Middleware, Next
from .delivery import Delivery
from .edge import read_task
from .recording import Recorder, natrio_error

#: A handler as the dispatcher calls it: the context in, the output (or None) out.
Handler = Callable[[TaskContext], Awaitable[Any]]


@attrs.frozen
class Route:
    """One registered task type: its handler and the options it was registered with."""

    task_type: str
    handler: Handler
    ack_wait: float
    retry: RetryPolicy | None
    timeout: float | None = None
    max_iterations: int = 100
    keep_checkpoint: bool = False
    #: Partitions of the task type (per-key order), or None.
    partitions: int | None = None
    #: Executions at once across the deployment (1: a singleton), or None for no bound.
    max_in_flight: int | None = None
    #: A :class:`natrio.RateLimit`, or None.
    rate_limit: Any = None


def without_pause(exc: BaseException) -> BaseException | None:
    """``exc`` less any ExecutionPaused in it (also inside exception groups), or None."""
    if isinstance(exc, ExecutionPaused):
        return None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(ExecutionPaused)[1]
    return exc


class Executor:
    """Runs deliveries for one worker: reads each at the edge and drives its handler."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        default_retry: RetryPolicy,
        logger: logging.Logger,
        middleware: Sequence[Middleware] = (),
        started_event_after: float | None = 0.0,
    ) -> None:
        self.recorder = recorder
        # Seconds a handler runs before its ``started`` event is published (None: never).
        self.started_event_after = started_event_after
        self.reporter = recorder.reporter
        self.default_retry = default_retry
        self.logger = logger
        self.middleware = tuple(middleware)
        self.inbox_prefix = recorder.reporter.conn.inbox_prefix
        self.malformed = 0
        self.deferrals = 0
        self.forwarded = 0
        self._calls: dict[str, Next] = {}
        self._limiters: dict[str, WorkerLimiter | ClusterLimiter] = {}

    def chain(self, route: Route) -> Next:
        """The handler of ``route`` wrapped in the middleware, first outermost (made once)."""
        call = self._calls.get(route.task_type)
        if call is None:
            handler = route.handler

            async def innermost(invocation: Invocation) -> Any:
                return await handler(invocation.context)

            call = innermost
            for middleware in reversed(self.middleware):
                call = middleware(call)
            self._calls[route.task_type] = call
        return call

    async def execute(self, delivery: Delivery, scope: trio.CancelScope) -> None:
        """Run ``delivery`` to its outcome under the runner's ``scope``.

        Raises only what natrio itself failed at (the runner logs it and the delivery is
        NAK'd), or the cancellation of ``scope`` (a deadline or a shutdown).
        """
        msg = delivery.msg
        route: Route = delivery.route
        try:
            task = read_task(
                msg,
                task_type=route.task_type,
                group=delivery.group,
                inbox_prefix=self.inbox_prefix,
                position=delivery.position,
                started_at=time.time(),
            )
        except MalformedTask as exc:
            self.logger.warning("dead-lettering malformed task on %r: %s", msg.subject[:200], exc)
            self.malformed += 1
            await self.recorder.malformed(delivery, str(exc), self.inbox_prefix)
            return
        if route.partitions is not None and task.placement is None:
            # Published without its partition (by a client that does not know the count,
            # in any language): moved into the partition of its Natrio-Key, else of its
            # run id. The consumer it came from hands out one task at a time, so tasks of
            # one key keep their order on the way.
            key = task.headers.get(wire.H_KEY) or task.run_id
            placement = wire.partition_placement(partition_of(key, route.partitions))
            try:
                with self.recorder.recording_scope():
                    await self.reporter.forward(task, placement)
            except (JetStreamError, PayloadTooLarge) as exc:
                # Refused for good (a copy over max_payload, a stream limit): dead-lettered,
                # or it would hold every later task of the plain consumer behind it.
                self.malformed += 1
                await self.recorder.malformed(
                    delivery,
                    f"cannot be moved into partition {placement}: {exc}",
                    self.inbox_prefix,
                )
                return
            delivery.ack()
            self.forwarded += 1
            return
        # From here on a shutdown out of grace cancels this execution (its checks are
        # shielded; the handler's first checkpoint then hands the task back).
        delivery.running = True
        if task.reply is not None and self.reporter.conn.is_own_inbox(task.reply):
            # One of this worker's own inboxes (its pulls, its requests' replies): answering
            # there could pass for a reply natrio waits for.
            task = attrs.evolve(task, reply=None)
        if task.reply is None and msg.header(wire.H_REPLY):
            self.logger.warning(
                "not answering %s/%s on %r: replies go only to subjects under %s.",
                task.run_id,
                task.step_id,
                msg.header(wire.H_REPLY),
                self.inbox_prefix,
            )
        if task.delivered > 1:
            with self.recorder.recording_scope():
                task = await self._account_for_pauses(task)
                settle = await self.reporter.finish_if_done(task)
            if settle == "term":
                delivery.term()
                return
            if settle == "ack":
                delivery.ack()
                return
        policy = task.retry or route.retry or self.default_retry
        ctx = TaskContext(
            task,
            _Finish(self.recorder, delivery),
            worker_id=self.reporter.worker_id,
            policy=policy,
            logger=self.logger,
        )
        delivery.ctx = ctx
        if policy.maximum_attempts and task.attempt > policy.maximum_attempts:
            # Delivered again after its last attempt ended without an outcome (a crash).
            await self.recorder.dead(
                delivery,
                ctx,
                natrio_error(
                    "AttemptsExhausted",
                    f"delivered {task.attempt} times; the policy allows {policy.maximum_attempts}",
                    "exhausted",
                    task,
                ),
            )
            return
        if task.deadline is not None and time.time() >= task.deadline:
            await self.recorder.dead(
                delivery,
                ctx,
                natrio_error(
                    "DeadlineExceeded", "the task's deadline passed before it ran", "deadline", task
                ),
            )
            return
        if route.rate_limit is not None:
            wait = await self._rate_limited(route, ctx)
            if wait is None:
                return  # the key function failed: recorded as the task's failure
            if wait > 0:
                # Held in the worker (kept alive, never settled) until then: a redelivery
                # would count as an attempt.
                delivery.deferred_until = trio.current_time() + wait
                delivery.running = False
                delivery.ctx = None
                self.deferrals += 1
                return
        if delivery.fenced:
            return  # given up while it was being checked: another worker may run it now
        if self.started_event_after == 0:
            self.reporter.started(task)
            delivery.announced = True
        # Otherwise the dispatcher announces it if it is still running by then.
        call = self.chain(route)
        if task.deadline is not None:
            scope.deadline = trio.current_time() + (task.deadline - time.time())
        tally = self.recorder.tallies[route.task_type]
        tally.started += 1
        began = time.perf_counter()
        try:
            if route.timeout is None:
                if self.middleware:
                    result = await call(Invocation(task, ctx))
                else:
                    result = await route.handler(ctx)  # the chain would only wrap it
            else:
                with trio.move_on_after(route.timeout) as timer:
                    result = await call(Invocation(task, ctx))
                if timer.cancelled_caught:
                    raise HandlerTimeout(f"the handler did not finish within {route.timeout} s")
        except BaseException as exc:
            delivery.running = False
            tally.durations.append(time.perf_counter() - began)
            failure = without_pause(exc)
            if failure is None:
                return  # ctx.pause() ended the execution, possibly from inside a nursery
            if scope.cancel_called:
                raise  # a deadline or a shutdown: the runner records the interruption
            # Anything else the handler raised is the task's failure, KeyboardInterrupt and
            # SystemExit included: nothing a task does stops the runner.
            if not ctx.finished:
                await ctx.fail(failure)
            elif delivery.settled:
                ctx.logger.warning("handler raised after its outcome was recorded: %r", failure)
            else:
                ctx.logger.error(
                    "recording the outcome failed (%r); the task will be redelivered", failure
                )
            return
        delivery.running = False
        tally.durations.append(time.perf_counter() - began)
        if not ctx.finished:
            # The common path, so without a shield of its own: the deadline is lifted and a
            # shutdown cancels only running handlers, so nothing cancels the recording
            # (unless the handler returned despite being cancelled).
            if task.deadline is not None:
                scope.deadline = math.inf
            ctx._claim("complete")
            await self.recorder.complete(delivery, ctx, result, shield=scope.cancel_called)

    async def _rate_limited(self, route: Route, ctx: TaskContext) -> float | None:
        # Seconds to wait before this start is allowed (0: now), or None when the key
        # function raised (the task then failed like a handler that raised).
        limit = route.rate_limit
        try:
            key = limit.key_of(ctx.task)
        except Exception as exc:
            ctx.logger.warning("the rate limit's key function failed: %r", exc)
            await ctx.fail(exc)
            return None
        limiter = self._limiters.get(route.task_type)
        if limiter is None:
            if limit.scope == "cluster":
                limiter = ClusterLimiter(
                    JetStream(self.reporter.conn), route.task_type, limit.limit, limit.per
                )
            else:
                limiter = WorkerLimiter(limit.limit, limit.per)
            self._limiters[route.task_type] = limiter
        if isinstance(limiter, WorkerLimiter):
            return limiter.acquire(key, trio.current_time())
        try:
            with self.recorder.recording_scope():
                return await limiter.acquire(key, time.time())
        except NatrioError as exc:
            # The counter could not be reached: wait rather than run unlimited.
            ctx.logger.warning("rate limit counter unavailable (%r); trying again in 1 s", exc)
            return 1.0

    async def interrupted(self, delivery: Delivery) -> None:
        """Record why a cancelled execution ended: handed back at shutdown, or past its deadline."""
        ctx = delivery.ctx
        if delivery.fenced:
            return  # given up: another worker may run it now, this one records nothing
        if ctx is not None and ctx.finished:
            return  # its outcome was recorded (or is lost with the NAK that follows)
        if delivery.cancelled_by_shutdown or ctx is None:
            await self.recorder.hand_back(delivery, self.inbox_prefix)
        else:
            await self.recorder.dead(
                delivery,
                ctx,
                natrio_error(
                    "DeadlineExceeded",
                    "the task's deadline passed while it ran",
                    "deadline",
                    ctx.task,
                ),
            )

    async def hand_back(self, delivery: Delivery) -> None:
        """Return a task that did not run (or was cancelled) at shutdown."""
        await self.recorder.hand_back(delivery, self.inbox_prefix)

    async def _account_for_pauses(self, task: Task) -> Task:
        # Pauses and shutdown returns are NAKs, which the server counts as deliveries:
        # take them back out.
        record = await self.recorder.state.pause_record(task.run_id, task.step_id, task.seq)
        if record is None:
            return task
        return attrs.evolve(
            task,
            attempt=max(1, task.delivered - record.pauses - record.returns),
            resumed=task.delivered == record.delivered_at_last_pause + 1,
        )


class _Finish:
    """Binds a context's terminal calls and state to the recorder and its delivery."""

    __slots__ = ("_delivery", "_recorder", "state")

    def __init__(self, recorder: Recorder, delivery: Delivery) -> None:
        self._recorder = recorder
        self._delivery = delivery
        self.state = recorder.state

    async def complete(self, ctx: TaskContext, output: object) -> None:
        await self._recorder.complete(self._delivery, ctx, output)

    async def fail(
        self, ctx: TaskContext, exc: BaseException, *, permanent: bool, delay: float | None
    ) -> None:
        with self._recorder.recording_scope():
            await self._recorder.fail(self._delivery, ctx, exc, permanent=permanent, delay=delay)

    async def pause(self, ctx: TaskContext, delay: float) -> None:
        await self._recorder.pause(self._delivery, ctx, delay)

    async def continue_with(self, ctx: TaskContext, output: object) -> None:
        await self._recorder.continue_with(self._delivery, ctx, output)

    def heartbeat(self, ctx: TaskContext) -> None:
        self._delivery.in_progress(trio.current_time())

    def put_stream(self, ctx: TaskContext, data: bytes) -> None:
        self._recorder.reporter.conn.publish_nowait(
            wire.stream_subject(ctx.run_id, ctx.step_id), data
        )
