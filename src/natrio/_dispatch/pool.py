"""The dispatcher: the queue of deliveries from every consumer, ``concurrency`` runner tasks
that survive anything a delivery does, the keep-alive of held tasks, and bounded shutdown."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from .._consumer import PullConsumer
from .._outcomes import Reporter
from .._retry import RetryPolicy
from .._state import StepState
from .._transport import Message
from ..middleware import Middleware
from .delivery import Delivery
from .edge import ack_position
from .execution import Executor, Route
from .lease import Prober
from .queue import Closed, RunnerQueue
from .recording import Recorder, StepHooks
from .tally import TaskTypeStatistics

if TYPE_CHECKING:
    from ..otel import _WorkerTelemetry

log = logging.getLogger("natrio.dispatcher")

# How many queued tasks a runner takes in a row before it lets other tasks run.
_BURST = 16


@attrs.define
class DispatcherStatistics:
    """A snapshot of the dispatcher's counters.

    ``malformed`` counts messages dead-lettered as not valid tasks (also in ``dead``);
    ``internal_errors`` counts deliveries natrio itself failed to process (each was
    handed back for redelivery).
    """

    concurrency: int
    queued: int
    in_flight: int
    processed: int
    failed: int
    retried: int
    dead: int
    malformed: int = 0
    internal_errors: int = 0
    #: Executions a rate limit held back (each tried again when due, using no attempt).
    deferred: int = 0
    #: Deliveries held back by a rate limit right now.
    waiting_for_rate: int = 0
    #: Tasks published without their partition, moved into it.
    forwarded: int = 0
    #: Exclusive deliveries given up because their lease ran short (see docs/routing.md).
    fenced: int = 0


class Dispatcher:
    """Runs handlers for deliveries from any number of consumers, ``concurrency`` at a time.

    Deliveries wait in one queue; ``concurrency`` runner tasks take them in arrival
    order, so the bound holds across task types. Every delivery the dispatcher accepted
    is settled once (acked, NAK'd or terminated) and released once, whatever the handler
    does. A fault of the dispatcher itself (not of a delivery) sets :attr:`failure` and
    :attr:`failed`, for the worker to end with.
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
        started_event_after: float | None = 0.0,
        telemetry: _WorkerTelemetry | None = None,
    ) -> None:
        self.reporter = reporter
        self.conn = reporter.conn
        # With telemetry (natrio.otel), its recorder and executor, chosen once here: a worker
        # without it runs exactly the code it would run without the extra.
        recorder_type = Recorder if telemetry is None else telemetry.recorder_type
        executor_type = Executor if telemetry is None else telemetry.executor_type
        self.recorder = recorder_type(
            reporter, state or StepState(reporter.conn), hooks=hooks, hook_timeout=hook_timeout
        )
        self.recorder.on_lone_ack = self._on_lone_ack
        self.executor = executor_type(
            self.recorder,
            default_retry=default_retry,
            logger=logger,
            middleware=middleware,
            started_event_after=started_event_after,
        )
        self.started_event_after = started_event_after
        self.concurrency = concurrency
        self.logger = logger
        self.stopping = False
        self.failure: BaseException | None = None
        self.failed = trio.Event()
        self.internal_errors = 0
        self._queue: RunnerQueue[Delivery] = RunnerQueue()
        self._held: set[Delivery] = set()
        self._running: set[Delivery] = set()
        self._all_done = trio.Event()
        self._keep_alive_scope = trio.CancelScope(shield=True)
        self._tick = 10.0
        # (due, order, delivery) of deliveries a rate limit holds back.
        self._deferred: list[tuple[float, int, Delivery]] = []
        self._deferral_order = itertools.count()
        self._deferral_changed = trio.Event()
        self._tick_changed = trio.Event()
        #: The request whose answer proves the link (set for workers with exclusive
        #: consumers: a read of the worker's own directory entry); None: no fencing.
        self.probe_subject: str | None = None
        self._prober = Prober()
        self._exclusive = 0
        self.fenced = 0

    # -- intake -----------------------------------------------------------------------

    def sink(
        self, route: Route, group: str, consumer: PullConsumer, *, exclusive: bool = False
    ) -> Callable[[Message], None]:
        """The function the consumer of ``route``'s task type in ``group`` hands messages to.

        ``exclusive``: the consumer lets one task (or a bound of them) out at a time, so
        its deliveries hold leases and are fenced when the link cannot prove them (see
        :mod:`natrio._dispatch.lease`); call :meth:`prove_link` before it first pulls.
        """
        prober = self._prober if exclusive and self.probe_subject is not None else None
        if prober is not None:
            self._exclusive += 1
        if route.ack_wait / 6 < self._tick:
            self._tick = route.ack_wait / 6
            self._tick_changed.set()  # the keep-alive loop may be sleeping a longer tick
        self.executor.chain(route)
        # Ack subjects were checked on arrival (ack_position).
        send = self.conn.publish_checked_nowait

        def release(delivery: Delivery) -> None:
            self._held.discard(delivery)
            consumer.release()

        def accept(msg: Message) -> None:
            position = ack_position(msg.reply)
            if position is None:
                # Not a JetStream delivery (a publish to the pull inbox): nothing to settle,
                # and nothing natrio may publish to.
                log.error("dropping a message without an ack subject on %r", msg.subject[:200])
                consumer.release()
                return
            delivery = Delivery(
                msg,
                route,
                group,
                send=send,
                on_release=release,
                # The consumer read the clock as it took the message (one read a task).
                now=consumer.last_activity,
                position=position,
            )
            if self.stopping:
                delivery.nak()  # at once: another worker takes it
                delivery.let_go()
                return
            if prober is not None:
                lease = delivery.lease = prober.lease(route.ack_wait)
                delivery.renew = self._renew
                if lease.fenced(delivery.last_progress):
                    # Sent before the last proof of the link: it may be another's by now.
                    self._fence(delivery)
                    delivery.let_go()
                    return
            self._held.add(delivery)
            self._queue.put(delivery)

        return accept

    def _in_flight(self) -> int:
        # Handlers running, and completions whose events are on their way.
        return len(self._running) + self.recorder.recording

    def _on_lone_ack(self) -> None:
        if self._in_flight() <= 1:
            # The only task in flight: its client is waiting for this reply now.
            self.conn.send_now()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the runner tasks and the keep-alive loop until cancelled.

        Runners serve inside shields (a handler is only ever cancelled by the dispatcher
        itself); they end once :meth:`shutdown` has handed every task back, or at once when
        cancelled while nothing runs.
        """
        remove_listener = self.conn.add_reconnect_listener(self._on_link_change, disconnects=True)
        async with trio.open_nursery() as nursery:
            self.recorder.spawn = nursery.start_soon
            for _ in range(self.concurrency):
                nursery.start_soon(self._guarded, self._runner)
            nursery.start_soon(self._guarded, self._keep_alive)
            nursery.start_soon(self._guarded, self._release_deferred)
            if self.started_event_after:
                nursery.start_soon(self._guarded, self._announce_started)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Cancelled without a shutdown: queued tasks go back, and the runners end.
                self.stopping = True
                self._keep_alive_scope.cancel()
                self._queue.close()
                remove_listener()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        # A loop of the dispatcher's own that fails is a bug, not a task's doing: report it
        # so that the worker ends (bounded) instead of serving nothing while it looks alive.
        try:
            await loop()
        except trio.Cancelled:
            raise
        except BaseException as exc:
            log.critical("a dispatcher loop failed; the worker stops", exc_info=exc)
            if self.failure is None:
                self.failure = exc
            self.failed.set()

    async def _runner(self) -> None:
        # One shielded scope serves delivery after delivery: a cancel scope per task cost
        # more than the rest of the dispatcher. The dispatcher cancels it for a deadline,
        # a handler timeout or a shutdown; the interrupted delivery is then dealt with and
        # a fresh scope takes over.
        #
        # A waiting task is taken without a trip through the scheduler, so a busy runner
        # works through a burst (the queue has woken another runner for the rest, in case
        # this one's handler waits); it yields every _BURST tasks so that it never keeps
        # the connection's read loop waiting for long.
        queue = self._queue
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
                                next_delivery = queue.take_nowait()
                            else:
                                burst = 0
                                next_delivery = await queue.take()
                            if next_delivery is None:
                                burst = 0
                                if self._in_flight() <= 1:
                                    # Nothing queued and nothing else in flight: what this
                                    # runner published goes out now, not after the rest of
                                    # the scheduler pass (a round trip's latency). Under
                                    # load the pass batches.
                                    self.conn.send_now()
                                next_delivery = await queue.take()
                        except Closed:
                            return
                        delivery = next_delivery
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
        # Survives anything the delivery does; the delivery is let go here exactly once.
        self._running.add(delivery)
        try:
            if self.stopping:
                await self.executor.hand_back(delivery)
            elif not delivery.fenced:  # fenced while it waited: it is another's now
                await self.executor.execute(delivery, scope)
        except BaseException as exc:
            if scope.cancel_called:
                # Interrupted by a deadline or a shutdown: record that out of reach of the
                # cancellation; the runner then takes a fresh scope.
                with self.recorder.recording_scope():
                    try:
                        await self.executor.interrupted(delivery)
                    except Exception:
                        log.exception("recording how %s ended failed", delivery.msg.subject[:200])
            else:
                self.internal_errors += 1
                log.exception(
                    "natrio failed to process %s; it will be redelivered",
                    delivery.msg.subject[:200],
                    exc_info=exc,
                )
        finally:
            delivery.running = False
            self._running.discard(delivery)
            if delivery.deferred_until is not None and not delivery.settled:
                # Held back by a rate limit: still held, tried again when it is due.
                self._defer(delivery)
            else:
                delivery.let_go()
            if self.stopping and not self._running:
                self._all_done.set()

    def _defer(self, delivery: Delivery) -> None:
        due = delivery.deferred_until
        assert due is not None
        if self.stopping:
            delivery.deferred_until = None
            if self.recorder.spawn is not None:
                self.recorder.spawn(self._hand_back_one, delivery)
            else:
                delivery.let_go()
            return
        heapq.heappush(self._deferred, (due, next(self._deferral_order), delivery))
        if self._deferred[0][2] is delivery:
            self._deferral_changed.set()  # sooner than what the loop sleeps for

    async def _release_deferred(self) -> None:
        # Deliveries a rate limit held back go back to the queue when they are due.
        while True:
            due = self._deferred[0][0] if self._deferred else math.inf
            with trio.move_on_at(due):
                await self._deferral_changed.wait()
            if self._deferral_changed.is_set():
                self._deferral_changed = trio.Event()
            now = trio.current_time()
            while self._deferred and self._deferred[0][0] <= now:
                delivery = heapq.heappop(self._deferred)[2]
                delivery.deferred_until = None
                self._queue.put(delivery)

    async def _keep_alive(self) -> None:
        # One loop keeps every held task alive, queued or running, with +WPI every ack_wait/3
        # (exclusive ones every tick, ack_wait/6, with a reply; and a probe of the link).
        # Shielded so that handlers finishing inside the shutdown grace stay alive too;
        # shutdown() (or the end of run()) ends it.
        with self._keep_alive_scope:
            while True:
                with trio.move_on_after(self._tick):
                    await self._tick_changed.wait()
                if self._tick_changed.is_set():
                    self._tick_changed = trio.Event()
                now = trio.current_time()
                if self._exclusive:
                    # Answers to probes may be waiting behind this tick (a late tick after
                    # a long pause): let the read loop hand them over before judging.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    now = trio.current_time()
                for delivery in list(self._held):
                    # Exclusive deliveries are renewed every tick, each renewal proven by
                    # its answer (see lease.py).
                    if delivery.lease is not None or (
                        now - delivery.last_progress >= delivery.route.ack_wait / 3
                    ):
                        delivery.in_progress(now)
                if self._exclusive:
                    self._check_leases(now)

    def _renew(self, delivery: Delivery, now: float) -> None:
        # +WPI with a reply: the consumer answers once it has processed it, which is what
        # proves the renewal (lease.py). Ack subjects were checked on arrival.
        epoch = self._prober.epoch
        prober = self._prober

        def on_answer(msg: Message | None, error: BaseException | None) -> None:
            lease = delivery.lease
            if msg is not None and epoch == prober.epoch and lease is not None:
                lease.renewed(now, trio.current_time())

        try:
            self.conn.request_nowait(
                delivery.msg.reply,
                b"+WPI",
                timeout=delivery.route.ack_wait,
                on_reply=on_answer,
                subject_checked=True,
            )
        except Exception as exc:  # the connection is closed: the lease runs out
            log.debug("cannot renew %s: %r", delivery.msg.subject[:200], exc)

    def _check_leases(self, now: float) -> None:
        # Fence what the link no longer proves; then probe it, for the leases of the
        # deliveries still to come.
        for delivery in list(self._held):
            lease = delivery.lease
            if lease is None or delivery.fenced or delivery.settled:
                continue  # settled: its outcome is in, nothing more to keep
            if lease.fenced(now):
                self._fence(delivery)
        assert self.probe_subject is not None
        prober = self._prober
        if not self.conn.connected or not prober.due():
            return  # a probe queued for a reconnect would prove what the old link lost
        sent, epoch = now, prober.epoch

        def on_answer(msg: Message | None, error: BaseException | None) -> None:
            prober.settled(epoch)
            if msg is not None:
                prober.answered(sent, epoch)

        try:
            self.conn.request_nowait(
                self.probe_subject, b"", timeout=self._tick * 6, on_reply=on_answer
            )
        except Exception as exc:  # the connection is closed: the leases run out
            prober.settled(epoch)
            log.debug("cannot probe the link: %r", exc)

    async def prove_link(self) -> None:
        """One probe, awaited: exclusive deliveries arriving after it hold a lease from its
        send time. Raises what the request raises."""
        if self.probe_subject is None:
            return
        prober = self._prober
        sent, epoch = trio.current_time(), prober.epoch
        await self.conn.request(self.probe_subject, b"", timeout=5.0)
        prober.answered(sent, epoch)

    def _on_link_change(self) -> None:
        self._prober.link_changed()
        self._tick_changed.set()  # renew and probe again at once

    def _fence(self, delivery: Delivery) -> None:
        self.fenced += 1
        log.warning(
            "giving up %s: the link to the server has not been proven for too long, so the "
            "server may have handed it to another worker",
            delivery.msg.subject[:200],
        )
        delivery.fence()

    async def _announce_started(self) -> None:
        # Started events for handlers that have run for started_event_after seconds: one
        # loop looks at the running ones a few times per period, instead of a message per
        # task for the many that end before anyone could use one.
        after = self.started_event_after
        assert after
        tick = min(max(after / 4, 0.05), 1.0)
        while True:
            await trio.sleep(tick)
            now = time.time()
            for delivery in list(self._running):
                ctx = delivery.ctx
                if (
                    delivery.running
                    and not delivery.announced
                    and ctx is not None
                    and not ctx.finished  # an outcome recorded: no started event after it
                ):
                    started = ctx.task.started_at
                    if started is not None and now - started >= after:
                        delivery.announced = True
                        try:
                            self.reporter.started(ctx.task)
                        except Exception as exc:  # the connection closing, say: not fatal
                            log.warning("could not publish a started event: %r", exc)

    # -- shutdown ---------------------------------------------------------------------

    async def shutdown(self, grace: float) -> None:
        """NAK every queued task at once, give running handlers ``grace`` seconds, cancel the rest.

        Returns within ``grace`` + 0.6 s. Tasks handed back this way are recorded as
        returns (not attempts) and NAK'd, so another worker takes them immediately. A
        handler that already recorded its outcome but keeps running is waited for and
        cancelled like any other.
        """
        self.stopping = True
        queued = self._queue.drain()
        # Held back by a rate limit: they go back like queued ones.
        queued.extend(entry[2] for entry in self._deferred)
        self._deferred.clear()
        for delivery in queued:
            delivery.deferred_until = None

        end_of_grace = trio.current_time() + grace
        async with trio.open_nursery() as nursery:
            # Queued tasks go back at once, while running handlers get their grace, and
            # completions on their way to the stream get theirs.
            for delivery in queued:
                nursery.start_soon(self._hand_back_one, delivery)
            with trio.move_on_at(end_of_grace):
                if self._running:
                    await self._all_done.wait()
                await self.recorder.wait_recorded()
        # Whatever is still being recorded now gets as long as the handlers do to unwind.
        self.recorder.cut(trio.current_time() + 0.4)
        if self._running:
            self.logger.warning(
                "cancelling %d handler(s) still running after %.1f s grace",
                len(self._running),
                grace,
            )
            for delivery in list(self._running):
                if not delivery.running:
                    continue  # recording its outcome, bounded by the cut above
                delivery.cancelled_by_shutdown = True
                if delivery.scope is not None:
                    delivery.scope.cancel()
        with trio.move_on_after(0.4):
            if self._running:
                await self._all_done.wait()
            await self.recorder.wait_recorded()
        # Anything still unsettled (a handler that ignores cancellation, a completion whose
        # event could not be stored in time) goes back now.
        for delivery in list(self._held):
            delivery.nak()
        self._keep_alive_scope.cancel()
        # Runners wait for the next task inside their shields: closing the queue ends them.
        self._queue.close()

    async def _hand_back_one(self, delivery: Delivery) -> None:
        try:
            await self.executor.hand_back(delivery)
        except Exception:
            log.exception("handing back %s failed", delivery.msg.subject[:200])
        finally:
            delivery.let_go()

    def statistics(self) -> DispatcherStatistics:
        """Counters: queued, in flight, processed, failed attempts, retried, dead."""
        counts = self.recorder.counts
        return DispatcherStatistics(
            concurrency=self.concurrency,
            queued=len(self._queue),
            in_flight=len(self._running),
            processed=counts.processed,
            failed=counts.failed,
            retried=counts.retried,
            dead=counts.dead,
            malformed=self.executor.malformed,
            internal_errors=self.internal_errors,
            deferred=self.executor.deferrals,
            waiting_for_rate=len(self._deferred),
            forwarded=self.executor.forwarded,
            fenced=self.fenced,
        )

    def task_type_statistics(self, task_types: Sequence[str]) -> dict[str, TaskTypeStatistics]:
        """Counters and handler-time percentiles of each of ``task_types``."""
        # In flight is counted here, from the running set, rather than kept per task.
        running: dict[str, int] = {}
        for delivery in self._running:
            task_type = delivery.route.task_type
            running[task_type] = running.get(task_type, 0) + 1
        tallies = self.recorder.tallies
        return {
            task_type: TaskTypeStatistics.of(
                task_type, tallies.get(task_type), running.get(task_type, 0)
            )
            for task_type in task_types
        }
