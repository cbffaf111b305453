"""The dispatcher: reads each delivery as a task, runs its handler under the concurrency bound
and a cancel scope, and turns what happened into ack, NAK-with-delay or dead letter."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from . import _wire as wire
from ._asyncio.bridge import Headers, Message
from ._codec import DecodeError, encode
from ._consumer import PullConsumer
from ._context import ExecutionPaused, TaskContext
from ._errors import ConfigurationError, Fatal, HandlerTimeout, NatrioError, Retryable
from ._outcomes import Reporter, Task, TaskError
from ._retry import RetryPolicy
from ._state import StepState
from .middleware import Invocation, Middleware, Next

log = logging.getLogger("natrio.dispatcher")

# How many queued tasks a runner takes in a row before it lets other tasks run.
_BURST = 16

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
    timeout: float | None = None
    max_iterations: int = 100
    keep_checkpoint: bool = False


class StepHooks(Protocol):
    """Observers of final outcomes: called exactly once per terminal outcome of a step.

    Never for an intermediate retry, a pause or an agent-loop iteration. A hook runs
    before the outcome is recorded, within the worker's ``hook_timeout``; if it raises or
    times out, the task is NAK'd and redelivered
    rather than acknowledged, so no outcome is lost (a hook may therefore see a step
    again after a crash: make it idempotent).
    """

    async def on_step_done(self, task: Task, output: bytes) -> None:
        """The step completed with ``output``."""

    async def on_step_failed(self, task: Task, error: TaskError) -> None:
        """The step was dead-lettered with ``error``."""


class Delivery:
    """A task message from the moment it arrives until it is acked, NAK'd or terminated."""

    __slots__ = (
        "cancelled_by_shutdown",
        "consumer",
        "ctx",
        "last_progress",
        "msg",
        "recording",
        "route",
        "scope",
        "settled",
    )

    def __init__(self, msg: Message, route: Route, consumer: PullConsumer, now: float) -> None:
        self.msg = msg
        self.route = route
        self.consumer = consumer
        self.last_progress = now
        self.scope: trio.CancelScope | None = None
        self.ctx: TaskContext | None = None
        self.cancelled_by_shutdown = False
        # Whether an ack, NAK or TERM has been queued for it.
        self.settled = False
        # Whether its completion event is on its way to the stream (pipelined).
        self.recording = False


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
    iteration = 1
    if wire.H_ITERATION in headers:
        try:
            iteration = int(headers[wire.H_ITERATION])
        except ValueError:
            iteration = 0
        if iteration < 1:
            raise MalformedTask(f"bad {wire.H_ITERATION} header {headers[wire.H_ITERATION]!r}")
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
        iteration=iteration,
        delivered=attempt,
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
        state: StepState | None = None,
        middleware: Sequence[Middleware] = (),
        hooks: StepHooks | None = None,
        hook_timeout: float = 10.0,
    ) -> None:
        self.reporter = reporter
        self.state = state or StepState(reporter.conn)
        self.middleware = tuple(middleware)
        self.hooks = hooks
        self.hook_timeout = hook_timeout
        self._calls: dict[str, Next] = {}
        self.concurrency = concurrency
        self.default_retry = default_retry
        self.logger = logger
        self.stopping = False
        self._send, self._receive = trio.open_memory_channel[Delivery](math.inf)
        self._held: set[Delivery] = set()
        self._running: set[Delivery] = set()
        self._all_done = trio.Event()
        self._keep_alive_scope = trio.CancelScope(shield=True)
        self._tick = 10.0
        self.processed = 0
        self.failed = 0
        self.retried = 0
        self.dead = 0

    # -- intake -----------------------------------------------------------------------

    def sink(self, route: Route, consumer: PullConsumer) -> Callable[[Message], None]:
        """The function a consumer hands its messages to."""
        self._tick = min(self._tick, route.ack_wait / 6)
        if route.task_type not in self._calls:
            self._calls[route.task_type] = self._chain(route)

        def accept(msg: Message) -> None:
            if self.stopping:
                self.reporter.nak(msg)
                consumer.release()
                return
            delivery = Delivery(msg, route, consumer, trio.current_time())
            self._held.add(delivery)
            self._send.send_nowait(delivery)

        return accept

    def _chain(self, route: Route) -> Next:
        handler = route.handler

        async def innermost(invocation: Invocation) -> Any:
            return await handler(invocation.context)

        call: Next = innermost
        # The first middleware in the list ends up outermost.
        for middleware in reversed(self.middleware):
            call = middleware(call)
        return call

    def _release(self, delivery: Delivery) -> None:
        if delivery in self._held:
            self._held.discard(delivery)
            delivery.consumer.release()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the runner tasks and the keep-alive loop until cancelled.

        Runners are shielded (a handler is only ever cancelled by the dispatcher itself);
        they end once :meth:`shutdown` has handed every task back, or at once when
        cancelled while nothing runs.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for _ in range(self.concurrency):
                nursery.start_soon(self._runner)
            nursery.start_soon(self._keep_alive)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Cancelled without a shutdown: queued tasks go back, and the runners end.
                self.stopping = True
                self._send.close()

    async def _runner(self) -> None:
        # One shielded scope serves delivery after delivery: a cancel scope per task cost
        # more than the rest of the dispatcher. The dispatcher cancels it for a deadline,
        # a handler timeout or a shutdown; the interrupted delivery is then dealt with and
        # a fresh scope takes over.
        #
        # A waiting task is taken without a trip through the scheduler (receive() always
        # makes one), so a busy runner works through a burst; it yields every
        # _BURST tasks so that it never keeps the connection's read loop waiting for long.
        receive = self._receive
        burst = 0
        carried: Delivery | None = None
        while True:
            with trio.CancelScope(shield=True) as scope:
                while True:
                    if carried is not None:
                        delivery, carried = carried, None
                    else:
                        try:
                            if burst < _BURST:
                                burst += 1
                                delivery = receive.receive_nowait()
                            else:
                                burst = 0
                                delivery = await receive.receive()
                        except trio.WouldBlock:
                            burst = 0
                            if len(self._running) <= 1:
                                # Nothing queued and nothing else in flight: what this
                                # runner published goes out now, not after the rest of the
                                # scheduler pass (a round trip's latency). Under load the
                                # pass batches.
                                self.reporter.conn.send_now()
                            try:
                                delivery = await receive.receive()
                            except (trio.EndOfChannel, trio.ClosedResourceError):
                                return
                        except (trio.EndOfChannel, trio.ClosedResourceError):
                            return
                    if scope.cancel_called:
                        # Cancelled for the task before (a deadline that fired as it
                        # finished): this one gets a fresh scope.
                        carried = delivery
                        break
                    delivery.scope = scope
                    await self._serve(delivery, scope)
                    if scope.deadline != math.inf:
                        # However the task ended, its deadline must not reach the next.
                        scope.deadline = math.inf

    async def _serve(self, delivery: Delivery, scope: trio.CancelScope) -> None:
        if self.stopping:
            await self._return(delivery)
            self._release(delivery)
            return
        self._running.add(delivery)
        try:
            await self._execute(delivery, scope)
        except BaseException as exc:
            if scope.cancel_called:
                # Interrupted by a deadline or a shutdown: record that, out of reach of the
                # cancellation, then let the cancellation end this runner scope.
                with trio.CancelScope(shield=True):
                    await self._interrupted(delivery)
            if not _is_failure(exc):
                raise
            # Nothing a task does may stop a runner; the task is redelivered below.
            log.exception("dispatching %s failed", delivery.msg.subject)
        finally:
            if not delivery.recording:
                self._finish(delivery)

    def _finish(self, delivery: Delivery) -> None:
        # The end of a delivery's stay: it no longer runs, and it leaves the window.
        self._running.discard(delivery)
        if not delivery.settled and delivery in self._held:
            # No outcome could be recorded (a failed terminal call, a crash in the
            # dispatcher): hand the task back rather than let it wait out AckWait.
            self.reporter.nak(delivery.msg, 1.0)
        self._release(delivery)
        if self.stopping and not self._running:
            self._all_done.set()

    async def _interrupted(self, delivery: Delivery) -> None:
        ctx = delivery.ctx
        if ctx is not None and ctx.finished:
            return  # its outcome was recorded (or is lost with the NAK that follows)
        if delivery.cancelled_by_shutdown or ctx is None:
            await self._return(delivery)
        else:
            await self._dead(
                delivery,
                ctx,
                _error(
                    "DeadlineExceeded",
                    "the task's deadline passed while it ran",
                    "deadline",
                    ctx.task,
                ),
            )

    async def _keep_alive(self) -> None:
        # One loop keeps every held task alive, queued or running, with +WPI every ack_wait/3.
        # Shielded so that handlers finishing inside the shutdown grace stay alive too;
        # shutdown() ends it.
        with self._keep_alive_scope:
            while True:
                await trio.sleep(self._tick)
                now = trio.current_time()
                for delivery in list(self._held):
                    if now - delivery.last_progress >= delivery.route.ack_wait / 3:
                        delivery.last_progress = now
                        self.reporter.in_progress(delivery.msg)

    async def _execute(self, delivery: Delivery, scope: trio.CancelScope) -> None:
        msg = delivery.msg
        try:
            task = read_task(msg)
        except MalformedTask as exc:
            self.logger.warning("dead-lettering malformed task on %s: %s", msg.subject, exc)
            with trio.CancelScope(shield=True):
                await self.reporter.malformed(msg, str(exc))
            delivery.settled = True
            self.dead += 1
            return
        route = delivery.route
        if task.delivered > 1:
            with trio.CancelScope(shield=True):
                task = await self._account_for_pauses(task)
                if await self.reporter.finish_if_done(task, msg):
                    delivery.settled = True
                    return
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
            await self._dead(
                delivery,
                ctx,
                _error(
                    "AttemptsExhausted",
                    f"delivered {task.attempt} times; the policy allows {policy.maximum_attempts}",
                    "exhausted",
                    task,
                ),
            )
            return
        if task.deadline is not None and time.time() >= task.deadline:
            await self._dead(
                delivery,
                ctx,
                _error(
                    "DeadlineExceeded", "the task's deadline passed before it ran", "deadline", task
                ),
            )
            return
        self.reporter.started(task)
        call = self._calls[route.task_type]
        delivery.ctx = ctx
        if task.deadline is not None:
            scope.deadline = trio.current_time() + (task.deadline - time.time())
        try:
            if route.timeout is None:
                result = await call(Invocation(task, ctx))
            else:
                with trio.move_on_after(route.timeout) as timer:
                    result = await call(Invocation(task, ctx))
                if timer.cancelled_caught:
                    raise HandlerTimeout(f"the handler did not finish within {route.timeout} s")
        except BaseException as exc:
            failure = _without_pause(exc)
            if failure is None:
                return  # ctx.pause() ended the execution, possibly from inside a nursery
            if not _is_failure(failure) or scope.cancel_called:
                raise
            if not ctx.finished:
                await ctx.fail(failure)
            elif delivery.settled:
                ctx.logger.warning("handler raised after its outcome was recorded: %r", failure)
            else:
                ctx.logger.error(
                    "recording the outcome failed (%r); the task will be redelivered", failure
                )
            return
        if not ctx.finished:
            # The common path, so without a shield of its own: the deadline is lifted and a
            # shutdown leaves finished executions alone, so nothing cancels the recording
            # (unless the handler returned despite being cancelled).
            if task.deadline is not None:
                scope.deadline = math.inf
            ctx._claim("complete")
            await self._complete(delivery, ctx, result, shield=scope.cancel_called)

    async def _return(self, delivery: Delivery) -> None:
        # Handed back by a shutdown, not failed: record that (briefly, best effort) so the
        # redelivery does not count as another attempt, then NAK for another worker.
        with trio.CancelScope(shield=True), trio.move_on_after(0.2):
            try:
                task = read_task(delivery.msg)
                await self.state.record_return(task.run_id, task.step_id, task.seq)
            except NatrioError as exc:
                log.debug("could not record the return of %s: %r", delivery.msg.subject, exc)
        self.reporter.nak(delivery.msg)
        delivery.settled = True

    async def _account_for_pauses(self, task: Task) -> Task:
        # Pauses and shutdown returns are NAKs, which the server counts as deliveries:
        # take them back out.
        record = await self.state.pause_record(task.run_id, task.step_id, task.seq)
        if record is None:
            return task
        return attrs.evolve(
            task,
            attempt=max(1, task.delivered - record.pauses - record.returns),
            resumed=task.delivered == record.delivered_at_last_pause + 1,
        )

    # -- outcomes ---------------------------------------------------------------------

    async def _run_hook(
        self, delivery: Delivery, ctx: TaskContext, name: str, value: object
    ) -> bool:
        hook = getattr(self.hooks, name, None) if self.hooks is not None else None
        if hook is None:
            return True
        try:
            # Bounded, like everything on the way to an outcome: a hung hook must not hold
            # the task (or a shutdown) forever.
            with trio.fail_after(self.hook_timeout):
                await hook(ctx.task, value)
        except Exception:
            delay = ctx.policy.delay(ctx.task.attempt)
            ctx.logger.exception(
                "step hook %s failed; the task will be redelivered in %.3f s", name, delay
            )
            self.reporter.nak(delivery.msg, delay)
            delivery.settled = True
            return False
        return True

    @staticmethod
    def _has_state(ctx: TaskContext) -> bool:
        # Only steps that may have state pay for clearing it: this execution touched it,
        # or an earlier delivery (which may have) came before.
        return ctx.used_state or ctx.task.delivered > 1 or ctx.task.iteration > 1

    async def _clear_state(self, delivery: Delivery, ctx: TaskContext) -> None:
        if self._has_state(ctx):
            try:
                await self.state.clear(
                    ctx.run_id, ctx.step_id, keep_checkpoint=delivery.route.keep_checkpoint
                )
            except NatrioError as exc:
                ctx.logger.warning("could not clear the step's checkpoint: %r", exc)

    async def _dead(self, delivery: Delivery, ctx: TaskContext, error: TaskError) -> None:
        ctx._finished = True
        with trio.CancelScope(shield=True):
            if not await self._run_hook(delivery, ctx, "on_step_failed", error):
                return
            payload, headers = await self.reporter.dead(ctx.task, delivery.msg, error)
            await self._clear_state(delivery, ctx)
            self.reporter.term(delivery.msg)
            delivery.settled = True
            self.reporter.announce(ctx.task, payload, headers)
        self.dead += 1

    async def _complete(
        self, delivery: Delivery, ctx: TaskContext, output: object, *, shield: bool = True
    ) -> None:
        try:
            payload = encode(output)
        except Exception as exc:
            await self._fail(delivery, ctx, exc, permanent=True, delay=None)
            return
        if shield:
            # Called from inside the handler, where any scope of the handler's may be
            # cancelled: the outcome is recorded regardless.
            with trio.CancelScope(shield=True):
                await self._record_completion(delivery, ctx, payload)
        else:
            await self._record_completion(delivery, ctx, payload)

    async def _record_completion(
        self, delivery: Delivery, ctx: TaskContext, payload: bytes
    ) -> None:
        if not await self._run_hook(delivery, ctx, "on_step_done", payload):
            return
        if not self._has_state(ctx) and self.reporter.hard_deadline == math.inf:
            # Pipelined: the runner moves on to the next task while the event is stored;
            # the ack follows the stream's acknowledgement (or the slow path below does).
            self.reporter.completed_nowait(
                ctx.task,
                payload,
                functools.partial(self._completion_stored, delivery, ctx, payload),
            )
            delivery.recording = True
            return
        headers = await self.reporter.completed(ctx.task, payload)
        await self._clear_state(delivery, ctx)
        self._acknowledge_completion(delivery, ctx, payload, headers)

    def _acknowledge_completion(
        self, delivery: Delivery, ctx: TaskContext, payload: bytes, headers: Headers
    ) -> None:
        # The completion event is stored: ack, then tell a waiting client.
        self.reporter.ack(delivery.msg)
        delivery.settled = True
        self.reporter.announce(ctx.task, payload, headers)
        self.processed += 1

    def _completion_stored(
        self,
        delivery: Delivery,
        ctx: TaskContext,
        payload: bytes,
        headers: Headers,
        error: NatrioError | None,
    ) -> None:
        delivery.recording = False
        if delivery.settled:
            pass  # a shutdown handed it back meanwhile; a redelivery finds the event
        elif error is None:
            self._acknowledge_completion(delivery, ctx, payload, headers)
            if len(self._running) == 1:
                # The only task in flight: its client is waiting for this reply now.
                self.reporter.conn.send_now()
        else:
            # A timeout, a leader election, a reconnect: retry the way unpipelined
            # completions do (the same Nats-Msg-Id keeps it to one event).
            log.debug("completion of %s not stored (%r); retrying", delivery.msg.subject, error)
            delivery.recording = True
            self._nursery.start_soon(self._record_completion_again, delivery, ctx, payload)
            return
        self._finish(delivery)

    async def _record_completion_again(
        self, delivery: Delivery, ctx: TaskContext, payload: bytes
    ) -> None:
        try:
            with trio.CancelScope(shield=True):
                headers = await self.reporter.completed(ctx.task, payload)
                if not delivery.settled:
                    self._acknowledge_completion(delivery, ctx, payload, headers)
        except NatrioError as exc:
            ctx.logger.error("recording the outcome failed (%r); the task will be redelivered", exc)
        finally:
            delivery.recording = False
            self._finish(delivery)

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
            kind = "timeout" if isinstance(cause, HandlerTimeout) else "error"
        error = TaskError.from_exception(exc, kind=kind, attempts=task.attempt)
        self.failed += 1
        if kind not in ("error", "timeout"):
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
        delivery.settled = True
        self.retried += 1

    async def _pause(self, delivery: Delivery, ctx: TaskContext, delay: float) -> None:
        task = ctx.task
        with trio.CancelScope(shield=True):
            await self.state.record_pause(task.run_id, task.step_id, task.seq, task.delivered)
        self.reporter.paused(task, delay)
        self.reporter.nak(delivery.msg, delay)
        delivery.settled = True

    async def _continue(self, delivery: Delivery, ctx: TaskContext, output: object) -> None:
        task = ctx.task
        if task.iteration >= delivery.route.max_iterations:
            await self._dead(
                delivery,
                ctx,
                _error(
                    "MaxIterationsExceeded",
                    f"the agent loop reached max_iterations ({delivery.route.max_iterations})",
                    "iterations",
                    task,
                ),
            )
            return
        try:
            payload = encode(output)
        except Exception as exc:
            await self._fail(delivery, ctx, exc, permanent=True, delay=None)
            return
        with trio.CancelScope(shield=True):
            await self.reporter.continued(task, delivery.msg, payload)
        delivery.settled = True
        self.processed += 1

    # -- shutdown ---------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """NAK every queued task at once, give running handlers ``grace`` seconds, cancel the rest.

        Returns within ``grace`` + 0.6 s. Tasks handed back this way are recorded as
        returns (not attempts) and NAK'd, so another worker takes them immediately.
        """
        self.stopping = True
        queued: list[Delivery] = []
        while True:
            try:
                queued.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break

        async def hand_back(delivery: Delivery) -> None:
            await self._return(delivery)
            self._release(delivery)

        async with trio.open_nursery() as nursery:
            # Queued tasks go back at once, while running handlers get their grace.
            for delivery in queued:
                nursery.start_soon(hand_back, delivery)
            if self._running:
                with trio.move_on_after(grace):
                    await self._all_done.wait()
        if self._running:
            self.logger.warning(
                "cancelling %d handler(s) still running after %.1f s grace",
                len(self._running),
                grace,
            )
            # Outcomes being recorded right now get as long as the handlers do to unwind.
            self.reporter.hard_deadline = trio.current_time() + 0.4
            self.hook_timeout = 0.4
            for delivery in list(self._running):
                if delivery.ctx is not None and delivery.ctx.finished:
                    continue  # recording its outcome, bounded by hard_deadline above
                delivery.cancelled_by_shutdown = True
                if delivery.scope is not None:
                    delivery.scope.cancel()
            with trio.move_on_after(0.4):
                await self._all_done.wait()
        # Anything still held and unsettled (a handler that ignores cancellation) goes back now.
        for delivery in list(self._held):
            if not delivery.settled:
                self.reporter.nak(delivery.msg)
                delivery.settled = True
            self._release(delivery)
        self._keep_alive_scope.cancel()
        # Runners wait for the next task inside their shields: closing the queue ends them.
        self._send.close()

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
    """Binds a context's terminal calls and state to the dispatcher and its delivery."""

    __slots__ = ("_delivery", "_dispatcher", "state")

    def __init__(self, dispatcher: Dispatcher, delivery: Delivery) -> None:
        self._dispatcher = dispatcher
        self._delivery = delivery
        self.state = dispatcher.state

    async def complete(self, ctx: TaskContext, output: object) -> None:
        await self._dispatcher._complete(self._delivery, ctx, output)

    async def fail(
        self, ctx: TaskContext, exc: BaseException, *, permanent: bool, delay: float | None
    ) -> None:
        await self._dispatcher._fail(self._delivery, ctx, exc, permanent=permanent, delay=delay)

    async def pause(self, ctx: TaskContext, delay: float) -> None:
        await self._dispatcher._pause(self._delivery, ctx, delay)

    async def continue_with(self, ctx: TaskContext, output: object) -> None:
        await self._dispatcher._continue(self._delivery, ctx, output)

    def heartbeat(self, ctx: TaskContext) -> None:
        self._delivery.last_progress = trio.current_time()
        self._dispatcher.reporter.in_progress(self._delivery.msg)

    def put_stream(self, ctx: TaskContext, data: bytes) -> None:
        self._dispatcher.reporter.conn.publish_nowait(
            wire.stream_subject(ctx.run_id, ctx.step_id), data
        )


def _without_pause(exc: BaseException) -> BaseException | None:
    """``exc`` less any ExecutionPaused in it (also inside exception groups), or None."""
    if isinstance(exc, ExecutionPaused):
        return None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(ExecutionPaused)[1]
    return exc


def _is_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a task's failure (an Exception, or a group of only those).

    Cancellation, KeyboardInterrupt and SystemExit are not: they must propagate.
    """
    return isinstance(exc, Exception)


def _error(error_type: str, message: str, kind: str, task: Task) -> TaskError:
    """A TaskError natrio itself raises (no exception, so no traceback)."""
    return TaskError(error_type, message, "", kind, task.attempt)
