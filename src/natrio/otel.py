"""OpenTelemetry traces and metrics of natrio's tasks (the ``otel`` extra).

``pip install 'natrio[otel]'`` brings the OpenTelemetry API; the application adds the SDK
and its exporters. Telemetry is switched on per worker and per client::

    worker = natrio.Worker(nc, telemetry=True)
    client = natrio.Client(nc, telemetry=True)

``True`` sends to OpenTelemetry's global tracer and meter providers; a :class:`Telemetry`
names others. natrio imports this module (and OpenTelemetry) only for a worker or client
that asks for telemetry: importing natrio, and running a worker without it, costs nothing.

What is recorded (docs/telemetry.md has the details):

- ``Client.submit`` makes a PRODUCER span ``natrio.submit <task_type>`` around the publish
  and puts its W3C trace context (``traceparent``, ``tracestate``) into the task's headers.
- Every execution on a worker is a CONSUMER span ``natrio.execute <task_type>``, a child
  of the context the task carries (every attempt of one task message shares that parent);
  it is the current span while the handler, its middleware and the step hooks run, so
  spans made there nest in it. Its ``natrio.outcome`` is one of :data:`OUTCOMES`.
- Every event the execution publishes (and the reply to a waiting client) carries the
  execution span's ``traceparent``; the next iteration of an agent loop carries it too,
  so each iteration is a child of the one that continued.
- Counters per task type (``natrio.task.started``, ``.succeeded``, ``.failed``,
  ``.retried``, ``.dead``), an up-down counter of executions under way
  (``natrio.task.in_flight``) and a histogram of handler times (``natrio.task.duration``).

Trace context from the wire is untrusted: the W3C propagator reads it, and a field it
rejects makes the execution a new root span, never a failed task. natrio publishes only
trace fields it wrote itself from a span.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, Final

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        f"natrio.otel needs OpenTelemetry: pip install 'natrio[otel]' ({exc})"
    ) from exc

import attrs
import trio

from . import _wire as wire
from ._context import TaskContext
from ._dispatch.delivery import Delivery
from ._dispatch.execution import Executor
from ._dispatch.recording import Recorder
from ._errors import NatrioError
from ._jetstream import JetStream
from ._model import Task, TaskError
from ._outcomes import Reporter
from ._state import StepState
from ._transport import Connection, Headers, Message
from ._version import __version__
from .middleware import Invocation, Middleware, Next

__all__ = ["OUTCOMES", "Telemetry"]

#: The instrumentation scope of natrio's tracer and meter.
SCOPE: Final = "natrio"

COMPLETED: Final = "completed"
CONTINUED: Final = "continued"
RETRIED: Final = "retried"
DEAD: Final = "dead"
PAUSED: Final = "paused"
HANDED_BACK: Final = "handed_back"
FENCED: Final = "fenced"
FAILED: Final = "failed"

#: Every value of an execution span's ``natrio.outcome``. ``completed``, ``continued`` (an
#: agent loop's next iteration enqueued), ``retried`` (the attempt failed and the task will
#: be delivered again), ``dead`` (dead-lettered), ``paused``, ``handed_back`` (returned
#: unfinished at shutdown), ``fenced`` (given up because its lease ran short, see
#: docs/routing.md) and ``failed`` (no outcome could be recorded, since a step hook or the
#: recording failed; the task is delivered again).
OUTCOMES: Final = (COMPLETED, CONTINUED, RETRIED, DEAD, PAUSED, HANDED_BACK, FENCED, FAILED)

_ERRORS: Final = frozenset((RETRIED, DEAD, FAILED))

#: Bucket boundaries advised for the handler-time histogram, in seconds (the SDK's default
#: ones are made for milliseconds).
DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

_TRACEPARENT: Final = "traceparent"
_TRACESTATE: Final = "tracestate"
_FIELDS: Final = frozenset((_TRACEPARENT, _TRACESTATE))
# What a header value natrio writes may hold: printable ASCII on one line (the W3C fields
# need no more), and short enough for any message.
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,1024}")

_PROPAGATOR: Final = TraceContextTextMapPropagator()


class _TaskHeaders(Getter[Mapping[str, str]]):
    """Reads the W3C fields from a message's headers, whatever their case: NATS keeps the
    case a publisher chose, and HTTP, where the fields come from, ignores it."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            for name, found in carrier.items():
                if name.lower() == key:
                    value = found
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER: Final = _TaskHeaders()


def _parent(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The context a task's headers carry; an empty one (a new trace) when they carry none
    or one the W3C propagator rejects."""
    if not headers:
        return otel_context.Context()
    try:
        return _PROPAGATOR.extract(headers, getter=_GETTER)
    except Exception:
        # The propagator answers bad fields with no parent; this is for input that makes
        # it raise instead: a task never fails over its trace context.
        return otel_context.Context()


def _fields(span: trace.Span) -> dict[str, str]:
    """The W3C fields naming ``span``, checked like any header natrio publishes; none for
    a span without a valid context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    traceparent = carrier.get(_TRACEPARENT)
    if traceparent is None or not _HEADER_VALUE.fullmatch(traceparent):
        return {}
    fields = {_TRACEPARENT: traceparent}
    tracestate = carrier.get(_TRACESTATE)
    if tracestate is not None and _HEADER_VALUE.fullmatch(tracestate):
        fields[_TRACESTATE] = tracestate
    return fields


def _without_fields(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _FIELDS}


class Telemetry:
    """Where the spans and metrics of workers and clients go.

    ``telemetry=True`` means ``telemetry=Telemetry()``: OpenTelemetry's global providers
    (``opentelemetry.trace.set_tracer_provider``, ``opentelemetry.metrics.set_meter_provider``),
    which may also be set after the worker or client was made. ``tracer_provider`` and
    ``meter_provider`` send to others instead. One Telemetry may serve any number of
    workers and clients; their metrics add up.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        #: The tracer natrio's spans come from (scope ``natrio``).
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        #: The meter natrio's instruments come from (scope ``natrio``).
        self.meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        meter = self.meter
        self._started = meter.create_counter(
            "natrio.task.started", unit="{execution}", description="Handler calls begun."
        )
        self._succeeded = meter.create_counter(
            "natrio.task.succeeded",
            unit="{execution}",
            description="Executions recorded as completed, or as continued (agent loops).",
        )
        self._failed = meter.create_counter(
            "natrio.task.failed",
            unit="{execution}",
            description="Failed attempts, whether retried or dead-lettered.",
        )
        self._retried = meter.create_counter(
            "natrio.task.retried",
            unit="{execution}",
            description="Failed attempts that will be retried.",
        )
        self._dead = meter.create_counter(
            "natrio.task.dead",
            unit="{task}",
            description="Tasks dead-lettered (malformed, exhausted and past their deadline too).",
        )
        self._in_flight = meter.create_up_down_counter(
            "natrio.task.in_flight", unit="{execution}", description="Executions under way."
        )
        self._duration = meter.create_histogram(
            "natrio.task.duration",
            unit="s",
            description="Wall-clock time of handler calls, middleware included.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        # Metric attributes by (task type, outcome): a handful per worker, made once.
        self._attributes: dict[tuple[str, str | None], dict[str, str]] = {}

    def __repr__(self) -> str:
        return f"<natrio.otel.Telemetry tracer={self.tracer!r} meter={self.meter!r}>"

    def _of(self, task_type: str, outcome: str | None = None) -> dict[str, str]:
        key = (task_type, outcome)
        found = self._attributes.get(key)
        if found is None:
            found = {"natrio.task_type": task_type}
            if outcome is not None:
                found["natrio.outcome"] = outcome
            self._attributes[key] = found
        return found

    def _for_worker(self, worker_id: str) -> _WorkerTelemetry:
        return _WorkerTelemetry(self, worker_id)

    def _jetstream(self, conn: Connection, *, timeout: float) -> JetStream:
        return _TracedJetStream(conn, self, timeout=timeout)


# -- the client -------------------------------------------------------------------------


def _submitted(subject: str) -> tuple[str, str, str, str] | None:
    """(task type, group, run id, step id) of a task subject, or of a delayed task's
    one-shot schedule (whose firing the server publishes with the schedule's headers,
    trace fields included); None for any other subject (a recurring schedule's firings
    each start a trace of their own)."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[0] != wire.PREFIX or parts[1] not in ("task", "delayed"):
        return None
    return parts[2], parts[3].partition("~")[0], parts[4], parts[5]


class _TracedJetStream(JetStream):
    """A client's JetStream API that wraps each task it publishes in a PRODUCER span and puts
    that span's context into the task's headers.

    The seam is the publish, not ``submit`` itself: every way a client stores a task (a
    submit, a replay) goes through it, and ``submit`` stays as it is without telemetry.
    """

    def __init__(self, conn: Connection, telemetry: Telemetry, *, timeout: float) -> None:
        super().__init__(conn, timeout=timeout)
        self._telemetry = telemetry

    async def publish(
        self, subject: str, payload: bytes, *, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Publish like :meth:`JetStream.publish`; a task inside a ``natrio.submit`` span."""
        ids = _submitted(subject)
        if ids is None:
            return await super().publish(subject, payload, headers=headers)
        task_type, group, run_id, step_id = ids
        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "natrio.task_type": task_type,
            "natrio.group": group,
            "natrio.run_id": run_id,
            "natrio.step_id": step_id,
        }
        with self._telemetry.tracer.start_as_current_span(
            f"natrio.submit {task_type}", kind=trace.SpanKind.PRODUCER, attributes=attributes
        ) as span:
            # The submit span is the task's parent, whatever trace fields the caller gave.
            traced = _without_fields(headers or {})
            traced.update(_fields(span))
            ack = await super().publish(subject, payload, headers=traced)
            if isinstance(ack.get("seq"), int):
                span.set_attribute("natrio.task_seq", ack["seq"])
            span.set_attribute("natrio.duplicate", bool(ack.get("duplicate")))
            return ack


# -- the worker -------------------------------------------------------------------------

#: The execution the running code belongs to: set by the runner, inherited by the
#: handler's child tasks and by the retry of a pipelined completion. The worker's own, so
#: that spans a handler makes (and makes current) never change where its events point.
_CURRENT: ContextVar[_Execution | None] = ContextVar("natrio_execution", default=None)


class _Execution:
    """One delivery's way through a worker, as telemetry follows it.

    Its span is made when first needed (the handler starts, an event is published, an
    outcome is recorded), with the time the execution began: a delivery that ends with
    none of these (one a rate limit holds back, one moved into its partition, the
    redelivery of a step that already has its outcome) makes no span.
    """

    __slots__ = (
        "_fields",
        "_token",
        "delivery",
        "ended",
        "handler_seconds",
        "outcome",
        "seq",
        "span",
        "start",
        "task_type",
        "worker",
    )

    def __init__(self, worker: _WorkerTelemetry, delivery: Delivery) -> None:
        self.worker = worker
        self.delivery: Delivery | None = delivery
        self.seq = delivery.position[1] if delivery.position else 0
        self.task_type: str = delivery.route.task_type
        self.start = time.time_ns()
        self.span: trace.Span | None = None
        self.outcome: str | None = None
        self.handler_seconds: float | None = None
        self.ended = False
        self._token: Token[otel_context.Context] | None = None
        self._fields: dict[str, str] | None = None

    def span_for(self, task: Task) -> trace.Span | None:
        """The execution's span, made now from ``task`` if it has none yet (None once ended)."""
        if self.span is None and not self.ended and self.delivery is not None:
            self.span = self.worker.start_span(task, self.delivery.msg.headers, self.start)
        return self.span

    def fields(self, task: Task) -> dict[str, str]:
        """The W3C fields naming the execution's span, for the headers of its events."""
        if self._fields is None:
            span = self.span_for(task)
            if span is None:
                return {}
            self._fields = _fields(span)
        return self._fields

    def attach(self, task: Task) -> None:
        """Make the span current in the runner until :meth:`detach`."""
        if self._token is None:
            span = self.span_for(task)
            if span is not None:
                self._token = otel_context.attach(trace.set_span_in_context(span))

    def detach(self) -> None:
        """Undo :meth:`attach`."""
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None

    @contextmanager
    def current(self, task: Task | None) -> Iterator[None]:
        """The span current for a block (made from ``task`` if it has none yet)."""
        span = self.span if task is None else self.span_for(task)
        if span is None or self.ended:
            yield
            return
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            yield

    def note(self, outcome: str, task: Task, error: TaskError | None = None) -> None:
        """Record what the execution came to (``error``: why it failed)."""
        self.outcome = outcome
        span = self.span_for(task)
        if span is None or self.ended or error is None:
            return
        span.add_event(
            "exception",
            {
                "exception.type": error.type,
                "exception.message": error.message,
                "exception.stacktrace": error.traceback,
                "natrio.error_kind": error.kind,
            },
        )
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{error.type}: {error.message}"))

    def end(self, exc: BaseException | None = None) -> None:
        """The runner is done with the delivery: end the span with the outcome (``exc``:
        what natrio itself failed at)."""
        if self.ended:
            return
        self.ended = True
        worker = self.worker
        if worker.active.get(self.seq) is self:
            del worker.active[self.seq]
        self.delivery = None
        telemetry = worker.telemetry
        telemetry._in_flight.add(-1, telemetry._of(self.task_type))
        span = self.span
        if span is None:
            return
        outcome = self.outcome or FAILED
        if exc is not None:
            span.record_exception(exc)
        if outcome == FAILED:
            span.set_status(
                trace.Status(
                    trace.StatusCode.ERROR,
                    "no outcome was recorded; the task will be delivered again",
                )
            )
        span.set_attribute("natrio.outcome", outcome)
        span.end()
        if self.handler_seconds is not None:
            telemetry._duration.record(self.handler_seconds, telemetry._of(self.task_type, outcome))


class _WorkerTelemetry:
    """One running worker's telemetry: its executions under way (by task sequence), the
    classes its dispatcher runs, and the spans they make."""

    def __init__(self, telemetry: Telemetry, worker_id: str) -> None:
        self.telemetry = telemetry
        self.worker_id = worker_id
        self.active: dict[int, _Execution] = {}

    # The dispatcher builds these instead of the plain ones (set below, once defined).
    reporter_type: type[_TracedReporter]
    recorder_type: type[Recorder]
    executor_type: type[Executor]

    def reporter(self, conn: Connection) -> Reporter:
        """The worker's outcome publisher, which puts trace fields into its events."""
        return self.reporter_type(conn, self.worker_id, telemetry=self)

    def begin(self, delivery: Delivery) -> _Execution:
        """A runner starts on ``delivery``."""
        execution = _Execution(self, delivery)
        # A second delivery of one message in one worker (after a fencing) replaces the
        # first here; each still ends its own span.
        self.active[execution.seq] = execution
        self.telemetry._in_flight.add(1, self.telemetry._of(execution.task_type))
        return execution

    def execution(self, task: Task) -> _Execution | None:
        """The execution under way for ``task``, or the one the running code belongs to."""
        found = self.active.get(task.seq)
        if found is None:
            found = _CURRENT.get()
            if found is None or found.worker is not self or found.seq != task.seq:
                return None
        return found

    def of_delivery(self, delivery: Delivery) -> _Execution | None:
        """The execution under way for ``delivery``."""
        seq = delivery.position[1] if delivery.position else 0
        found = self.active.get(seq)
        return found if found is not None and found.delivery is delivery else None

    def start_span(self, task: Task, headers: Mapping[str, str] | None, start: int) -> trace.Span:
        """A CONSUMER span for an execution of ``task``, child of what ``headers`` carry."""
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": wire.task_subject(
                task.task_type, task.group, task.run_id, task.step_id, task.placement
            ),
            "natrio.task_type": task.task_type,
            "natrio.group": task.group,
            "natrio.run_id": task.run_id,
            "natrio.step_id": task.step_id,
            "natrio.attempt": task.attempt,
            "natrio.iteration": task.iteration,
            "natrio.task_seq": task.seq,
            "natrio.worker_id": self.worker_id,
        }
        return self.telemetry.tracer.start_span(
            f"natrio.execute {task.task_type}",
            context=_parent(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            start_time=start,
        )

    # The counters, counted at the points where the worker counts its statistics.

    def started(self, task_type: str) -> None:
        """A handler call begins."""
        self.telemetry._started.add(1, self.telemetry._of(task_type))

    def succeeded(self, task_type: str, outcome: str) -> None:
        """A completion (or continuation) was recorded."""
        self.telemetry._succeeded.add(1, self.telemetry._of(task_type, outcome))

    def failed(self, task_type: str) -> None:
        """An attempt failed."""
        self.telemetry._failed.add(1, self.telemetry._of(task_type))

    def retried(self, task_type: str) -> None:
        """A failed attempt will be retried."""
        self.telemetry._retried.add(1, self.telemetry._of(task_type))

    def dead(self, task_type: str) -> None:
        """A task was dead-lettered."""
        self.telemetry._dead.add(1, self.telemetry._of(task_type))


class _TracedReporter(Reporter):
    """Publishes outcomes like :class:`Reporter`, with the execution span's trace fields in
    every event, and notes each outcome on that span."""

    def __init__(
        self, conn: Connection, worker_id: str, *, telemetry: _WorkerTelemetry, **options: Any
    ) -> None:
        super().__init__(conn, worker_id, **options)
        self.telemetry = telemetry

    def _note(self, task: Task, outcome: str, error: TaskError | None = None) -> _Execution | None:
        found = self.telemetry.execution(task)
        if found is not None:
            found.note(outcome, task, error)
        return found

    def _headers(self, task: Task, **extra: str) -> dict[str, str]:
        headers = super()._headers(task, **extra)
        found = self.telemetry.execution(task)
        if found is not None:
            headers.update(found.fields(task))
        return headers

    def completion_headers(self, task: Task) -> Headers:
        headers = super().completion_headers(task)
        found = self.telemetry.execution(task)
        fields = found.fields(task) if found is not None else None
        if not fields:
            return headers
        return Headers.of_own({**headers, **fields})

    def completed_nowait(
        self,
        task: Task,
        output: bytes,
        headers: Headers,
        on_stored: Callable[[NatrioError | None], None],
    ) -> None:
        found = self._note(task, COMPLETED)
        if found is None:
            super().completed_nowait(task, output, headers, on_stored)
            return

        def stored(error: NatrioError | None) -> None:
            # A completion the stream did not store is published again from a task started
            # here, which inherits this context: its event names the same execution.
            token = _CURRENT.set(found)
            try:
                on_stored(error)
            finally:
                _CURRENT.reset(token)
            if error is None:
                self.telemetry.succeeded(task.task_type, COMPLETED)

        super().completed_nowait(task, output, headers, stored)

    async def completed(self, task: Task, output: bytes) -> Headers:
        headers = await super().completed(task, output)
        self._note(task, COMPLETED)
        self.telemetry.succeeded(task.task_type, COMPLETED)
        return headers

    def failed(self, task: Task, error: TaskError, delay: float) -> None:
        super().failed(task, error, delay)
        self._note(task, RETRIED, error)
        self.telemetry.retried(task.task_type)

    async def dead(
        self, task: Task, subject: str, error: TaskError
    ) -> tuple[bytes, dict[str, str]]:
        recorded = await super().dead(task, subject, error)
        self._note(task, DEAD, error)
        self.telemetry.dead(task.task_type)
        return recorded

    async def malformed(
        self,
        msg: Message,
        reason: str,
        *,
        task_type: str,
        group: str,
        seq: int,
        attempts: int,
        ids: tuple[str, str] | None,
        reply: str | None,
    ) -> None:
        await super().malformed(
            msg,
            reason,
            task_type=task_type,
            group=group,
            seq=seq,
            attempts=attempts,
            ids=ids,
            reply=reply,
        )
        self.telemetry.dead(task_type)
        run_id, step_id = ids or ("malformed", f"seq{seq}")
        # What the span is named after: the message holds no valid task.
        task = Task(task_type, group, run_id, step_id, b"", {}, attempts, seq)
        error = TaskError("MalformedTask", reason[:1024], "", "malformed", attempts)
        self._note(task, DEAD, error)

    async def forward(self, task: Task, placement: str) -> None:
        # The copy keeps the context the task came with, as the W3C propagator reads it:
        # written anew, or left out when it was rejected.
        headers = _without_fields(task.headers)
        headers.update(_fields(trace.get_current_span(_parent(task.headers))))
        await super().forward(attrs.evolve(task, headers=headers), placement)

    def paused(self, task: Task, delay: float) -> None:
        super().paused(task, delay)
        self._note(task, PAUSED)

    async def continued(
        self, task: Task, subject: str, next_input: bytes, headers: Headers | None = None
    ) -> None:
        await super().continued(task, subject, next_input, headers)
        self._note(task, CONTINUED)
        self.telemetry.succeeded(task.task_type, CONTINUED)

    @staticmethod
    def next_iteration_headers(task: Task) -> Headers:
        """The next iteration's headers, with the trace fields of this execution's span
        (not the ones the task came with): the iteration is a child of the one that
        continued. Called by the execution's own code, where :data:`_CURRENT` is set."""
        headers = _without_fields(Reporter.next_iteration_headers(task))
        found = _CURRENT.get()
        if found is not None and found.seq == task.seq:
            headers.update(found.fields(task))
        return Headers(headers)


class _TracedRecorder(Recorder):
    """Records outcomes like :class:`Recorder`; counts failed attempts, makes a dead
    letter's span current for its hook, and notes hand-backs."""

    def __init__(self, reporter: Reporter, state: StepState, **options: Any) -> None:
        super().__init__(reporter, state, **options)
        if not isinstance(reporter, _TracedReporter):
            raise TypeError("a traced recorder needs a traced reporter")
        self.telemetry = reporter.telemetry

    async def fail(
        self,
        delivery: Delivery,
        ctx: TaskContext,
        exc: BaseException,
        *,
        permanent: bool,
        delay: float | None,
    ) -> None:
        self.telemetry.failed(ctx.task.task_type)
        await super().fail(delivery, ctx, exc, permanent=permanent, delay=delay)

    async def dead(self, delivery: Delivery, ctx: TaskContext, error: TaskError) -> None:
        found = self.telemetry.of_delivery(delivery)
        if found is None:
            await super().dead(delivery, ctx, error)
            return
        # Also for a dead letter made before any handler ran (a passed deadline, used-up
        # attempts): the step hook's own spans nest in the execution's.
        with found.current(ctx.task):
            await super().dead(delivery, ctx, error)

    async def hand_back(self, delivery: Delivery, inbox_prefix: str) -> None:
        await super().hand_back(delivery, inbox_prefix)
        found = self.telemetry.of_delivery(delivery)
        if found is not None:
            found.outcome = HANDED_BACK


class _TracedExecutor(Executor):
    """Runs deliveries like :class:`Executor`, each as an :class:`_Execution`: its span
    current while the handler, the hooks and the recording run."""

    def __init__(
        self, recorder: Recorder, *, middleware: Sequence[Middleware] = (), **options: Any
    ) -> None:
        if not isinstance(recorder, _TracedRecorder):
            raise TypeError("a traced executor needs a traced recorder")
        self.telemetry = recorder.telemetry
        # Outermost, so that the user's middleware run inside the execution's span.
        super().__init__(recorder, middleware=(self._traced, *middleware), **options)

    def _traced(self, call: Next) -> Next:
        telemetry = self.telemetry

        async def traced(invocation: Invocation) -> Any:
            found = _CURRENT.get()
            if found is None or found.worker is not telemetry:
                return await call(invocation)
            task = invocation.task
            # Attached in the runner (the chain's outermost call runs there) and detached
            # by execute(): the hooks and the recording after the handler stay inside.
            found.attach(task)
            telemetry.started(task.task_type)
            began = time.perf_counter()
            try:
                return await call(invocation)
            finally:
                found.handler_seconds = time.perf_counter() - began

        return traced

    async def execute(self, delivery: Delivery, scope: trio.CancelScope) -> None:
        found = self.telemetry.begin(delivery)
        token = _CURRENT.set(found)
        interrupted = False
        failure: BaseException | None = None
        try:
            await super().execute(delivery, scope)
        except BaseException as exc:
            if scope.cancel_called:
                interrupted = True  # interrupted() records how it ended, then ends the span
            else:
                failure = exc  # natrio's own fault: the runner logs it, the task comes back
            raise
        finally:
            _CURRENT.reset(token)
            found.detach()
            if not interrupted:
                found.end(failure)

    async def interrupted(self, delivery: Delivery) -> None:
        found = self.telemetry.of_delivery(delivery)
        if found is None:
            await super().interrupted(delivery)
            return
        token = _CURRENT.set(found)
        try:
            with found.current(None):
                await super().interrupted(delivery)
            if delivery.fenced:
                found.outcome = FENCED
        finally:
            _CURRENT.reset(token)
            found.end()


_WorkerTelemetry.reporter_type = _TracedReporter
_WorkerTelemetry.recorder_type = _TracedRecorder
_WorkerTelemetry.executor_type = _TracedExecutor
