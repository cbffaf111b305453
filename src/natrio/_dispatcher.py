"""The dispatcher: reads each delivery as a task, runs its handler under the concurrency bound
and a cancel scope, and turns what happened into ack, NAK-with-delay or dead letter."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from . import _wire as wire
from ._bridge import Message
from ._codec import DecodeError, encode
from ._consumer import PullConsumer
from ._context import TaskContext
from ._errors import ConfigurationError, Fatal, NatrioError, Retryable
from ._outcomes import Reporter, Task, TaskError
from ._retry import RetryPolicy

log = logging.getLogger("natrio.dispatcher")

#: A handler as the dispatcher calls it: the context in, the output (or None) out.
Handler = Callable[[TaskContext], Awaitable[Any]]


class MalformedTask(NatrioError):
    """A message on a task subject that is not a valid task."""


@attrs.frozen
class Route:
    """One registered task type: its handler and the options it was registered with."""

    task_type: str
    handler: Handler
    ack_wait: float
    retry: RetryPolicy | None


class Delivery:
    """A task message from the moment it arrives until it is acked, NAK'd or terminated."""

    __slots__ = ("cancelled_by_shutdown", "consumer", "last_progress", "msg", "route", "scope")

    def __init__(self, msg: Message, route: Route, consumer: PullConsumer, now: float) -> None:
        self.msg = msg
        self.route = route
        self.consumer = consumer
        self.last_progress = now
        self.scope: trio.CancelScope | None = None
        self.cancelled_by_shutdown = False


def read_task(msg: Message) -> Task:
    """Parse a delivered message into a Task, or raise MalformedTask saying why."""
    parsed = wire.parse_task_subject(msg.subject)
    if parsed is None:
        raise MalformedTask(
            f"subject {msg.subject!r} is not natrio.task.<type>.<group>.<run>.<step>"
        )
    try:
        attempt, seq = wire.parse_ack_subject(msg.reply)
    except ValueError as exc:
        raise MalformedTask(str(exc)) from None
    headers = msg.headers or {}
    retry = None
    if wire.H_RETRY in headers:
        try:
            retry = RetryPolicy.from_json(headers[wire.H_RETRY])
        except ConfigurationError as exc:
            raise MalformedTask(f"bad {wire.H_RETRY} header: {exc}") from None
    deadline = None
    if wire.H_DEADLINE in headers:
        try:
            deadline = float(headers[wire.H_DEADLINE])
        except ValueError:
            raise MalformedTask(
                f"bad {wire.H_DEADLINE} header {headers[wire.H_DEADLINE]!r}"
            ) from None
        if not math.isfinite(deadline):
            raise MalformedTask(f"bad {wire.H_DEADLINE} header {headers[wire.H_DEADLINE]!r}")
    return Task(
        task_type=parsed[0],
        group=parsed[1],
        run_id=parsed[2],
        step_id=parsed[3],
        input=msg.data,
        headers=headers,
        attempt=attempt,
        seq=seq,
        deadline=deadline,
        retry=retry,
        reply=headers.get(wire.H_REPLY) or None,
    )


@attrs.define
class DispatcherStatistics:
    """A snapshot of the dispatcher's counters."""

    concurrency: int
    queued: int
    in_flight: int
    processed: int
    failed: int
    retried: int
    dead: int


class Dispatcher:
    """Runs handlers for deliveries from any number of consumers, ``concurrency`` at a time.

    Deliveries wait in one queue; ``concurrency`` runner tasks take them in arrival
    order, so the bound holds across task types. Every delivery the dispatcher accepted
    ends acked, NAK'd or terminated, whatever the handler does.
    """

    def __init__(
        self,
        reporter: Reporter,
        *,
        concurrency: int,
        default_retry: RetryPolicy,
        logger: logging.Logger,
    ) -> None:
        self.reporter = reporter
        self.concurrency = concurrency
        self.default_retry = default_retry
        self.logger = logger
        self.stopping = False
        self._send, self._receive = trio.open_memory_channel[Delivery](math.inf)
        self._held: set[Delivery] = set()
        self._running: set[Delivery] = set()
        self._all_done = trio.Event()
        self._tick = 10.0
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self.dead = 0

    # -- intake -----------------------------------------------------------------------

    def sink(self, route: Route, consumer: PullConsumer) -> Callable[[Message], None]:
        """The function a consumer hands its messages to."""
        self._tick = min(self._tick, route.ack_wait / 6)

        def accept(msg: Message) -> None:
            if self.stopping:
                self.reporter.nak(msg)
                consumer.release()
                return
            delivery = Delivery(msg, route, consumer, trio.current_time())
            self._held.add(delivery)
            self._send.send_nowait(delivery)

        return accept

    def _release(self, delivery: Delivery) -> None:
        if delivery in self._held:
            self._held.discard(delivery)
            delivery.consumer.release()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the runner tasks and the keep-alive loop until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._runner)
            nursery.start_soon(self._keep_alive)
            task_status.started()

    async def _runner(self) -> None:
        async for delivery in self._receive:
            if self.stopping:
                self.reporter.nak(delivery.msg)
                self._release(delivery)
                continue
            self._running.add(delivery)
            try:
                await self._execute(delivery)
            except Exception:
                # Nothing a task does may stop a runner; leave the task to be redelivered.
                log.exception("dispatching %s failed; NAK'ing it", delivery.msg.subject)
                if delivery in self._held:
                    self.reporter.nak(delivery.msg, 1.0)
            finally:
                self._running.discard(delivery)
                self._release(delivery)
                if self.stopping and not self._running:
                    self._all_done.set()

    async def _keep_alive(self) -> None:
        # One loop keeps every held task alive, queued or running, with +WPI every ack_wait/3.
        while True:
            await trio.sleep(self._tick)
            now = trio.current_time()
            for delivery in list(self._held):
                if now - delivery.last_progress >= delivery.route.ack_wait / 3:
                    delivery.last_progress = now
                    self.reporter.in_progress(delivery.msg)

    async def _execute(self, delivery: Delivery) -> None:
        msg = delivery.msg
        try:
            task = read_task(msg)
        except MalformedTask as exc:
            self.logger.warning("dead-lettering malformed task on %s: %s", msg.subject, exc)
            with trio.CancelScope(shield=True):
                await self.reporter.malformed(msg, str(exc))
            self.dead += 1
            return
        route = delivery.route
        policy = task.retry or route.retry or self.default_retry
        ctx = TaskContext(
            task,
            _Finish(self, delivery),
            worker_id=self.reporter.worker_id,
            policy=policy,
            logger=self.logger,
        )
        if policy.maximum_attempts and task.attempt > policy.maximum_attempts:
            # Delivered again after its last attempt ended without an outcome (a crash).
            error = TaskError(
                "AttemptsExhausted",
                f"delivered {task.attempt} times; the policy allows {policy.maximum_attempts}",
                kind="exhausted",
                attempts=task.attempt,
            )
            await self._dead(delivery, ctx, error)
            return
        if task.deadline is not None and time.time() >= task.deadline:
            await self._dead(
                delivery,
                ctx,
                TaskError(
                    "DeadlineExceeded",
                    "the task's deadline passed before it ran",
                    kind="deadline",
                    attempts=task.attempt,
                ),
            )
            return
        if task.attempt > 1:
            with trio.CancelScope(shield=True):
                if await self.reporter.finish_if_completed(task, msg):
                    return
        self.reporter.started(task)
        # Shielded: cancelling the worker's scope must not cut a handler short; the
        # dispatcher cancels this scope itself after the shutdown grace period.
        with trio.CancelScope(shield=True) as scope:
            delivery.scope = scope
            if task.deadline is not None:
                scope.deadline = trio.current_time() + (task.deadline - time.time())
            try:
                result = await route.handler(ctx)
            except Exception as exc:
                if ctx.finished:
                    ctx.logger.warning("handler raised after its outcome was recorded: %r", exc)
                else:
                    await ctx.fail(exc)
            else:
                if not ctx.finished:
                    await ctx.complete(result)
        if ctx.finished:
            return
        if delivery.cancelled_by_shutdown:
            self.reporter.nak(msg)
        else:
            await self._dead(
                delivery,
                ctx,
                TaskError(
                    "DeadlineExceeded",
                    "the task's deadline passed while it ran",
                    kind="deadline",
                    attempts=task.attempt,
                ),
            )

    # -- outcomes ---------------------------------------------------------------------

    async def _dead(self, delivery: Delivery, ctx: TaskContext, error: TaskError) -> None:
        ctx._finished = True
        with trio.CancelScope(shield=True):
            await self.reporter.dead(ctx.task, delivery.msg, error)
        self.dead += 1

    async def _complete(self, delivery: Delivery, ctx: TaskContext, output: object) -> None:
        try:
            payload = encode(output)
        except Exception as exc:
            await self._fail(delivery, ctx, exc, permanent=True, delay=None)
            return
        with trio.CancelScope(shield=True):
            await self.reporter.completed(ctx.task, delivery.msg, payload)
        self.processed += 1

    async def _fail(
        self,
        delivery: Delivery,
        ctx: TaskContext,
        exc: BaseException,
        *,
        permanent: bool,
        delay: float | None,
    ) -> None:
        task, policy = ctx.task, ctx.policy
        cause = (
            exc.reason
            if isinstance(exc, Fatal | Retryable) and isinstance(exc.reason, BaseException)
            else exc
        )
        if isinstance(cause, DecodeError):
            kind = "decode"
        elif permanent or not policy.retryable(exc):
            kind = "fatal"
        elif policy.exhausted(task.attempt):
            kind = "exhausted"
        else:
            kind = "error"
        error = TaskError.from_exception(exc, kind=kind, attempts=task.attempt)
        self.failed += 1
        if kind != "error":
            ctx.logger.warning(
                "task dead (%s) after attempt %d: %s: %s",
                kind,
                task.attempt,
                error.type,
                error.message,
            )
            await self._dead(delivery, ctx, error)
            return
        if delay is None:
            delay = (
                exc.delay
                if isinstance(exc, Retryable) and exc.delay is not None
                else policy.delay(task.attempt)
            )
        ctx.logger.info(
            "attempt %d failed (%s: %s); retrying in %.3f s",
            task.attempt,
            error.type,
            error.message,
            delay,
        )
        self.reporter.failed(task, delivery.msg, error, delay)
        self.retried += 1

    # -- shutdown ---------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """NAK every queued task at once, give running handlers ``grace`` seconds, cancel the rest.

        Returns within ``grace`` + 1 s. Cancelled handlers' tasks are NAK'd so another
        worker takes them immediately.
        """
        self.stopping = True
        while True:
            try:
                delivery = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            self.reporter.nak(delivery.msg)
            self._release(delivery)
        if self._running:
            with trio.move_on_after(grace):
                await self._all_done.wait()
        if self._running:
            self.logger.warning(
                "cancelling %d handler(s) still running after %.1f s grace",
                len(self._running),
                grace,
            )
            for delivery in list(self._running):
                delivery.cancelled_by_shutdown = True
                if delivery.scope is not None:
                    delivery.scope.cancel()
            with trio.move_on_after(1.0):
                await self._all_done.wait()
        # Anything still held (a handler that ignores cancellation) goes back now.
        for delivery in list(self._held):
            self.reporter.nak(delivery.msg)
            self._release(delivery)

    def statistics(self) -> DispatcherStatistics:
        """Counters: queued, in flight, processed, failed attempts, retried, dead."""
        return DispatcherStatistics(
            concurrency=self.concurrency,
            queued=len(self._held) - len(self._running),
            in_flight=len(self._running),
            processed=self.processed,
            failed=self.failed,
            retried=self.retried,
            dead=self.dead,
        )


class _Finish:
    """Binds a context's terminal calls to the dispatcher and its delivery."""

    __slots__ = ("_delivery", "_dispatcher")

    def __init__(self, dispatcher: Dispatcher, delivery: Delivery) -> None:
        self._dispatcher = dispatcher
        self._delivery = delivery

    async def complete(self, ctx: TaskContext, output: object) -> None:
        await self._dispatcher._complete(self._delivery, ctx, output)

    async def fail(
        self, ctx: TaskContext, exc: BaseException, *, permanent: bool, delay: float | None
    ) -> None:
        await self._dispatcher._fail(self._delivery, ctx, exc, permanent=permanent, delay=delay)

    def heartbeat(self, ctx: TaskContext) -> None:
        self._delivery.last_progress = trio.current_time()
        self._dispatcher.reporter.in_progress(self._delivery.msg)
