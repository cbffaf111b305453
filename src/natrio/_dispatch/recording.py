"""Carrying out an execution's outcome: step hooks, the durable record, then the one
settlement of its delivery — completion (pipelined where it can be), retry, dead letter,
pause, agent-loop continuation, or a hand-back at shutdown."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from .. import _wire as wire
from .._codec import encode
from .._errors import NatrioError, PayloadTooLarge
from .._model import Task, TaskError
from .._outcomes import Reporter
from .._state import StepState
from .._transport import Headers
from .edge import check_reply, read_task, reply_target
from .policy import Dead, decide, finite_delay
from .tally import Tally

if TYPE_CHECKING:
    from .._context import TaskContext
    from .delivery import Delivery

log = logging.getLogger("natrio.dispatcher")


class StepHooks(Protocol):
    """Observers of final outcomes: called exactly once per terminal outcome of a step.

    Never for an intermediate retry, a pause or an agent-loop iteration. A hook runs
    before the outcome is recorded, within the worker's ``hook_timeout``; if it raises or
    times out, the task is NAK'd and redelivered rather than acknowledged, so no outcome
    is lost (a hook may therefore see a step again after a crash: make it idempotent).
    """

    async def on_step_done(self, task: Task, output: bytes) -> None:
        """The step completed with ``output``."""

    async def on_step_failed(self, task: Task, error: TaskError) -> None:
        """The step was dead-lettered with ``error``."""


def natrio_error(error_type: str, message: str, kind: str, task: Task) -> TaskError:
    """A TaskError natrio itself raises (no exception, so no traceback)."""
    return TaskError(error_type, message, "", kind, task.attempt)


@attrs.define
class Counts:
    """Outcomes recorded so far."""

    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0


class Recorder:
    """Records outcomes for one worker and settles their deliveries; keeps the counters."""

    def __init__(
        self,
        reporter: Reporter,
        state: StepState,
        *,
        hooks: StepHooks | None,
        hook_timeout: float,
    ) -> None:
        self.reporter = reporter
        self.state = state
        self.hooks = hooks
        self.hook_timeout = hook_timeout
        # Where retries of pipelined completions run (the dispatcher's nursery).
        self.spawn: Callable[..., Any] | None = None
        # Called when a pipelined completion is acknowledged while nothing else runs.
        self.on_lone_ack: Callable[[], None] = lambda: None
        self.counts = Counts()
        #: The same outcomes by task type, with the handler calls (see tally.py).
        self.tallies: defaultdict[str, Tally] = defaultdict(Tally)
        # Pipelined completions whose events are on their way to the stream.
        self.recording = 0
        self._none_recording = trio.Event()
        # The shielded scopes outcomes are recorded in, so a shutdown can bound them all.
        self._scopes: set[trio.CancelScope] = set()
        self._cut_at = math.inf

    @contextlib.contextmanager
    def recording_scope(self) -> Iterator[trio.CancelScope]:
        # Shielded: cancelling the handler never cuts an outcome short. Bounded: a
        # shutdown out of grace gives every recording the same short deadline (cut()).
        with trio.CancelScope(shield=True, deadline=self._cut_at) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def cut(self, deadline: float) -> None:
        """Bound every outcome being recorded now, and every later one, by ``deadline``."""
        self._cut_at = deadline
        self.reporter.hard_deadline = deadline
        self.hook_timeout = min(self.hook_timeout, max(deadline - trio.current_time(), 0.0))
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, deadline)

    def _recorded_one(self) -> None:
        self.recording -= 1
        if not self.recording:
            self._none_recording.set()
            self._none_recording = trio.Event()

    async def wait_recorded(self) -> None:
        """Return once no pipelined completion is on its way."""
        while self.recording:
            await self._none_recording.wait()

    # -- hooks and state --------------------------------------------------------------

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
            delivery.nak(delay)
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

    # -- terminal outcomes ------------------------------------------------------------

    async def dead(self, delivery: Delivery, ctx: TaskContext, error: TaskError) -> None:
        """Dead-letter the task: hook, entry and event, then ``+TERM`` and the reply."""
        ctx._finished = True
        with self.recording_scope():
            if not await self._run_hook(delivery, ctx, "on_step_failed", error):
                return
            payload, headers = await self.reporter.dead(ctx.task, delivery.msg.subject, error)
            await self._clear_state(delivery, ctx)
            if delivery.term():
                self.reporter.announce(ctx.task, payload, headers)
        self.counts.dead += 1
        self.tallies[ctx.task.task_type].dead += 1

    async def complete(
        self, delivery: Delivery, ctx: TaskContext, output: object, *, shield: bool = True
    ) -> None:
        """Record the completion with ``output``, then ack and answer the client."""
        try:
            payload = encode(output)
        except Exception as exc:
            await self.fail(delivery, ctx, exc, permanent=True, delay=None)
            return
        if not self.reporter.fits(payload):
            too_large = PayloadTooLarge(
                f"the output of {len(payload)} bytes does not fit in a message "
                f"(max_payload {self.reporter.conn.max_payload})"
            )
            await self.fail(delivery, ctx, too_large, permanent=True, delay=None)
            return
        if shield:
            # Called from inside the handler, where any scope of the handler's may be
            # cancelled: the outcome is recorded regardless.
            with self.recording_scope():
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
            # The recording holds the delivery, so it is released only when both are done.
            delivery.hold()
            self.recording += 1
            try:
                headers = self.reporter.completion_headers(ctx.task)
                self.reporter.completed_nowait(
                    ctx.task,
                    payload,
                    headers,
                    functools.partial(self._completion_stored, delivery, ctx, payload, headers),
                )
            except BaseException:
                self._recorded_one()
                delivery.let_go()
                raise
            return
        headers = await self.reporter.completed(ctx.task, payload)
        await self._clear_state(delivery, ctx)
        self._acknowledge(delivery, ctx, payload, headers)

    def _acknowledge(
        self, delivery: Delivery, ctx: TaskContext, payload: bytes, headers: Headers
    ) -> None:
        # The completion event is stored: ack, then tell a waiting client.
        if delivery.ack():
            self.reporter.announce(ctx.task, payload, headers)
            self.counts.processed += 1
            self.tallies[ctx.task.task_type].succeeded += 1

    def _completion_stored(
        self,
        delivery: Delivery,
        ctx: TaskContext,
        payload: bytes,
        headers: Headers,
        error: NatrioError | None,
    ) -> None:
        # Called from the connection's read loop (or its request sweeper): never raises,
        # and lets go of the delivery exactly once, here or in the retry it starts.
        retrying = False
        try:
            if delivery.settled:
                pass  # a shutdown handed it back meanwhile; a redelivery finds the event
            elif error is None:
                self._acknowledge(delivery, ctx, payload, headers)
                self.on_lone_ack()
            elif self.spawn is not None:
                # A timeout, a leader election, a reconnect: retry the way unpipelined
                # completions do (the same Nats-Msg-Id keeps it to one event).
                log.debug("completion of %s not stored (%r); retrying", delivery.msg.subject, error)
                self.spawn(self._record_completion_again, delivery, ctx, payload)
                retrying = True
        except Exception:
            log.exception("settling the completion of %s failed", delivery.msg.subject)
        finally:
            if not retrying:
                self._recorded_one()
                delivery.let_go()

    async def _record_completion_again(
        self, delivery: Delivery, ctx: TaskContext, payload: bytes
    ) -> None:
        try:
            with self.recording_scope():
                if not delivery.settled:
                    headers = await self.reporter.completed(ctx.task, payload)
                    self._acknowledge(delivery, ctx, payload, headers)
        except Exception as exc:
            ctx.logger.error("recording the outcome failed (%r); the task will be redelivered", exc)
        finally:
            self._recorded_one()
            delivery.let_go()

    async def fail(
        self,
        delivery: Delivery,
        ctx: TaskContext,
        exc: BaseException,
        *,
        permanent: bool,
        delay: float | None,
    ) -> None:
        """Fail this attempt: retry after the policy's (or the given) delay, or dead-letter."""
        task = ctx.task
        decision = decide(exc, ctx.policy, task.attempt, permanent=permanent, delay=delay)
        error = decision.error
        self.counts.failed += 1
        tally = self.tallies[task.task_type]
        tally.failed += 1
        if isinstance(decision, Dead):
            ctx.logger.warning(
                "task dead (%s) after attempt %d: %s: %s",
                error.kind,
                task.attempt,
                error.type,
                error.message,
            )
            await self.dead(delivery, ctx, error)
            return
        ctx.logger.info(
            "attempt %d failed (%s: %s); retrying in %.3f s",
            task.attempt,
            error.type,
            error.message,
            decision.delay,
        )
        self.reporter.failed(task, error, decision.delay)
        delivery.nak(decision.delay)
        self.counts.retried += 1
        tally.retried += 1

    async def pause(self, delivery: Delivery, ctx: TaskContext, delay: float) -> None:
        """Record the pause (so it uses no attempt) and NAK with the delay."""
        task = ctx.task
        delay = finite_delay(delay)
        with self.recording_scope():
            await self.state.record_pause(task.run_id, task.step_id, task.seq, task.delivered)
        self.reporter.paused(task, delay)
        delivery.nak(delay)

    async def continue_with(self, delivery: Delivery, ctx: TaskContext, output: object) -> None:
        """Enqueue the next iteration of an agent loop (or dead-letter past max_iterations)."""
        task = ctx.task
        if task.iteration >= delivery.route.max_iterations:
            await self.dead(
                delivery,
                ctx,
                natrio_error(
                    "MaxIterationsExceeded",
                    f"the agent loop reached max_iterations ({delivery.route.max_iterations})",
                    "iterations",
                    task,
                ),
            )
            return
        try:
            payload = encode(output)
            # The task's own headers go on with it: checked here, so one from the wire that
            # cannot be published again fails the step instead of the recording.
            headers = self.reporter.next_iteration_headers(task)
            if len(payload) + len(headers.block) > self.reporter.conn.max_payload:
                raise PayloadTooLarge(
                    f"the next iteration's input of {len(payload)} bytes and its headers "
                    "do not fit in a message"
                )
        except Exception as exc:
            await self.fail(delivery, ctx, exc, permanent=True, delay=None)
            return
        # The task's own subject, which is the message's but for a recurring schedule's
        # firing: its run id is the firing's, not the schedule id the message came on.
        subject = wire.task_subject(
            task.task_type, task.group, task.run_id, task.step_id, task.placement
        )
        with self.recording_scope():
            await self.reporter.continued(task, subject, payload, headers)
        if delivery.ack():
            self.counts.processed += 1
            self.tallies[task.task_type].succeeded += 1

    async def hand_back(self, delivery: Delivery, inbox_prefix: str) -> None:
        """Return a task at shutdown: recorded (briefly, best effort) as a return, so the
        redelivery uses no attempt, then NAK'd for another worker at once."""
        with self.recording_scope(), trio.move_on_after(0.2):
            try:
                task = delivery.ctx.task if delivery.ctx is not None else None
                if task is None:
                    task = read_task(
                        delivery.msg,
                        task_type=delivery.route.task_type,
                        group=delivery.group,
                        inbox_prefix=inbox_prefix,
                        position=delivery.position,
                    )
                await self.state.record_return(task.run_id, task.step_id, task.seq)
            except Exception as exc:
                log.debug("could not record the return of %s: %r", delivery.msg.subject, exc)
        delivery.nak()

    async def malformed(self, delivery: Delivery, reason: str, inbox_prefix: str) -> None:
        """Dead-letter a message that is not a valid task, terminate it, tell its client."""
        msg = delivery.msg
        attempts, seq = delivery.position or (1, 0)
        parts = msg.subject.split(".") if msg.subject.isascii() else []
        ids = None
        if len(parts) == 6 and wire.valid_id(parts[4]) and wire.valid_id(parts[5]):
            ids = (parts[4], parts[5])
        reply = None
        raw_reply = msg.header(wire.H_REPLY)
        if raw_reply:
            try:
                reply = reply_target(check_reply(raw_reply), inbox_prefix)
            except NatrioError:
                reply = None
        with self.recording_scope():
            await self.reporter.malformed(
                msg,
                reason,
                task_type=delivery.route.task_type,
                # The entry names the plain group (a placed consumer's token has more).
                group=delivery.group.partition("~")[0],
                seq=seq,
                attempts=attempts,
                ids=ids,
                reply=reply,
            )
        delivery.term()
        self.counts.dead += 1
        self.tallies[delivery.route.task_type].dead += 1
