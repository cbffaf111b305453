"""OpenTelemetry (natrio.otel): spans from submit through the execution to the events, metrics
of the executions, untrusted trace context, and a natrio that never imports OpenTelemetry
unless asked to."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

import trio
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

import natrio
from natrio import _wire as wire
from natrio.otel import Telemetry
from natrio.testing import WorkerFactory

from .helpers import eventually

FAST_RETRY = natrio.RetryPolicy(initial_interval=0.05, maximum_attempts=3)


class Traces:
    """A tracer provider that keeps finished spans in memory, and a Telemetry sending to it."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(tracer_provider=self.provider, meter_provider=self.meters)
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans (named ``name``), in the order they ended."""
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    async def wait_for(self, name: str, count: int = 1) -> list[ReadableSpan]:
        """The first ``count`` finished spans named ``name``, once that many have ended."""
        await eventually(lambda: len(self.spans(name)) >= count)
        return self.spans(name)[:count]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
        """Every data point collected now, by (metric name, sorted attributes): the value of
        sums, the count of histograms."""
        points: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        key = (metric.name, tuple(sorted((point.attributes or {}).items())))
                        points[key] = getattr(point, "value", None)
                        if points[key] is None:
                            points[key] = getattr(point, "count", None)
        return points

    def close(self) -> None:
        self.provider.shutdown()
        self.meters.shutdown()


@pytest.fixture
def traces() -> Iterator[Traces]:
    found = Traces()
    try:
        yield found
    finally:
        found.close()


def traceparent(span: ReadableSpan) -> str:
    """The W3C ``traceparent`` naming ``span``."""
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def trace_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id


async def stored_event(nc: natrio.Connection, subject: str) -> natrio.Message:
    """The last event stored on ``subject``."""
    msg = await natrio.Client(nc).js.last_message(wire.EVENT_STREAM, subject)
    assert msg is not None, subject
    return msg


async def test_a_trace_runs_from_submit_through_the_handler_to_the_events(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry, started_event_after=0)
    inside: list[trace.SpanContext] = []

    @worker.handle("echo")
    async def echo(ctx: natrio.TaskContext) -> bytes:
        inside.append(trace.get_current_span().get_span_context())
        with traces.tracer.start_as_current_span("user work"):
            await trio.lowlevel.checkpoint()
        return ctx.input

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    with traces.tracer.start_as_current_span("request"):
        handle = await client.submit(
            "echo", b"hi", run_id="r1", step_id="s1", headers={"traceparent": "ignored"}
        )
    assert await handle.result() == b"hi"

    (execution,) = await traces.wait_for("natrio.execute echo")
    (submit,) = traces.spans("natrio.submit echo")
    (request,) = traces.spans("request")
    (user,) = traces.spans("user work")
    # request > submit (PRODUCER) > execution (CONSUMER) > the handler's own span.
    assert submit.kind is SpanKind.PRODUCER
    assert execution.kind is SpanKind.CONSUMER
    assert parent_id(submit) == span_id(request)
    assert parent_id(execution) == span_id(submit)
    assert parent_id(user) == span_id(execution)
    assert len({trace_id(s) for s in (request, submit, execution, user)}) == 1
    assert execution.parent is not None
    assert execution.parent.is_remote
    # Inside the handler, the current span is the execution's.
    assert [c.span_id for c in inside] == [span_id(execution)]

    assert dict(execution.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": "natrio.task.echo.default.r1.s1",
        "natrio.task_type": "echo",
        "natrio.group": "default",
        "natrio.run_id": "r1",
        "natrio.step_id": "s1",
        "natrio.attempt": 1,
        "natrio.iteration": 1,
        "natrio.task_seq": handle.seq,
        "natrio.worker_id": worker.worker_id,
        "natrio.outcome": "completed",
    }
    assert (submit.attributes or {})["natrio.task_seq"] == handle.seq
    assert execution.status.status_code is StatusCode.UNSET

    # Every event of the execution carries the execution span's context.
    for kind in (wire.STARTED, wire.COMPLETED):
        event = await stored_event(natrio_connection, wire.event_subject("echo", "r1", "s1", kind))
        assert event.header("traceparent") == traceparent(execution), kind


async def test_the_task_carries_the_submit_span_context(
    natrio_connection: natrio.Connection, traces: Traces
) -> None:
    # No worker: the task stays in the stream, headers and all.
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    handle = await client.submit("parked", b"", run_id="r2", headers={"TraceParent": "x"})
    (submit,) = traces.spans("natrio.submit parked")
    stored = await natrio.Client(natrio_connection).js.last_message(
        wire.TASK_STREAM, f"natrio.task.parked.default.r2.{handle.step_id}"
    )
    assert stored is not None
    assert stored.headers is not None
    assert stored.header("traceparent") == traceparent(submit)
    assert "TraceParent" not in stored.headers  # the caller's field gave way to the span's
    assert submit.parent is None  # nothing was current: a new trace


@pytest.mark.skipif(
    "delay" not in inspect.signature(natrio.Client.submit).parameters,
    reason="delayed tasks (docs/schedules.md) are not part of this natrio",
)
async def test_a_delayed_task_carries_its_submit_span_context(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)

    @worker.handle("later")
    async def later(ctx: natrio.TaskContext) -> None:
        return None

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    # By name, so that this file type-checks without the option as well.
    submit_kw: dict[str, Any] = {"delay": 0.3}
    handle = await client.submit("later", run_id="r11", **submit_kw)
    await handle.result()
    (execution,) = await traces.wait_for("natrio.execute later")
    (submit,) = traces.spans("natrio.submit later")
    assert (submit.attributes or {})["natrio.run_id"] == "r11"
    assert parent_id(execution) == span_id(submit)


async def test_a_failed_then_completed_task_has_one_span_per_attempt(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry, retry=FAST_RETRY)
    attempts: list[int] = []

    @worker.handle("flaky")
    async def flaky(ctx: natrio.TaskContext) -> bytes:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first time unlucky")
        return b"ok"

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    handle = await client.submit("flaky", run_id="r3", step_id="s")
    assert await handle.result() == b"ok"
    assert attempts == [1, 2]

    first, second = await traces.wait_for("natrio.execute flaky", 2)
    (submit,) = traces.spans("natrio.submit flaky")
    # Both attempts deliver the same message: siblings under the submit span.
    assert parent_id(first) == parent_id(second) == span_id(submit)
    assert [(s.attributes or {})["natrio.attempt"] for s in (first, second)] == [1, 2]
    assert [(s.attributes or {})["natrio.outcome"] for s in (first, second)] == [
        "retried",
        "completed",
    ]
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "RuntimeError: first time unlucky"
    (error,) = [e for e in first.events if e.name == "exception"]
    assert (error.attributes or {})["exception.type"] == "RuntimeError"
    assert "first time unlucky" in str((error.attributes or {})["exception.stacktrace"])
    assert second.status.status_code is StatusCode.UNSET

    failed = await stored_event(natrio_connection, wire.event_subject("flaky", "r3", "s", "failed"))
    completed = await stored_event(
        natrio_connection, wire.event_subject("flaky", "r3", "s", "completed")
    )
    assert failed.header("traceparent") == traceparent(first)
    assert completed.header("traceparent") == traceparent(second)


async def test_agent_loop_iterations_are_children_of_the_one_that_continued(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)

    @worker.handle("loop")
    async def loop(ctx: natrio.TaskContext) -> bytes | None:
        if ctx.iteration < 3:
            await ctx.continue_with(b"more")
            return None
        return b"done"

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    handle = await client.submit("loop", run_id="r4", step_id="s")
    assert await handle.result() == b"done"

    ended = await traces.wait_for("natrio.execute loop", 3)
    # In the order they ran (the next iteration may end before the one that enqueued it).
    spans = sorted(ended, key=lambda s: int(str((s.attributes or {})["natrio.iteration"])))
    (submit,) = traces.spans("natrio.submit loop")
    assert [(s.attributes or {})["natrio.iteration"] for s in spans] == [1, 2, 3]
    assert [(s.attributes or {})["natrio.outcome"] for s in spans] == [
        "continued",
        "continued",
        "completed",
    ]
    assert [parent_id(s) for s in spans] == [span_id(submit), span_id(spans[0]), span_id(spans[1])]
    assert len({trace_id(s) for s in spans}) == 1
    continued = await stored_event(
        natrio_connection, wire.event_subject("loop", "r4", "s", "continued")
    )
    assert continued.header("traceparent") == traceparent(spans[1])  # the last to continue


async def test_a_pause_a_resume_and_the_step_hook_inside_the_execution(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    class Hooks:
        async def on_step_done(self, task: natrio.Task, output: bytes) -> None:
            with traces.tracer.start_as_current_span("hook"):
                pass

        async def on_step_failed(self, task: natrio.Task, error: natrio.TaskError) -> None:
            raise AssertionError(error)

    worker = natrio_worker_factory(telemetry=traces.telemetry, hooks=Hooks())

    @worker.handle("nap")
    async def nap(ctx: natrio.TaskContext) -> bytes:
        if not ctx.resumed:
            await ctx.pause(0.05)
        return b"rested"

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    handle = await client.submit("nap", run_id="r8", step_id="s")
    assert await handle.result() == b"rested"
    paused, resumed = await traces.wait_for("natrio.execute nap", 2)
    (submit,) = traces.spans("natrio.submit nap")
    # Both are deliveries of the one message: siblings, like attempts.
    assert parent_id(paused) == parent_id(resumed) == span_id(submit)
    assert [(s.attributes or {})["natrio.outcome"] for s in (paused, resumed)] == [
        "paused",
        "completed",
    ]
    # A pause uses no attempt.
    assert [(s.attributes or {})["natrio.attempt"] for s in (paused, resumed)] == [1, 1]
    assert paused.status.status_code is StatusCode.UNSET
    (hook,) = traces.spans("hook")
    assert parent_id(hook) == span_id(resumed)
    event = await stored_event(natrio_connection, wire.event_subject("nap", "r8", "s", "paused"))
    assert event.header("traceparent") == traceparent(paused)


async def test_a_task_handed_back_at_shutdown(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry, started_event_after=0.05)
    running = trio.Event()

    @worker.handle("stuck")
    async def stuck(ctx: natrio.TaskContext) -> None:
        running.set()
        await trio.sleep_forever()

    await natrio_worker_factory.start(worker)
    started = await natrio_connection.subscribe(wire.event_subject("stuck", "r9", "*", "started"))
    async with started:
        await natrio.Client(natrio_connection).submit("stuck", run_id="r9")
        await running.wait()
        with trio.fail_after(5):
            event = await started.receive()
    worker.stop(0)
    (execution,) = await traces.wait_for("natrio.execute stuck")
    # Announced by the dispatcher's loop, outside the execution, naming its span all the same.
    assert event.header("traceparent") == traceparent(execution)
    assert (execution.attributes or {})["natrio.outcome"] == "handed_back"
    assert execution.status.status_code is StatusCode.UNSET
    await eventually(lambda: not worker.statistics().running)
    points = traces.metrics()
    assert points[("natrio.task.in_flight", (("natrio.task_type", "stuck"),))] == 0


GARBAGE = [
    "garbage",
    "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # the all-zero trace id is invalid
    "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",  # version ff is invalid
    "00-" + "1" * 32 + "-" + "1" * 16 + "-01-extra",  # version 00 has nothing after
    "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # upper case hex is not allowed
    "01-" + "1" * 32 + "-" + "1" * 16 + "-01-" + "x" * 600,  # a later version, but too long
    "00-\u00e9\u00e9-\ufffd",
]


@pytest.mark.parametrize("value", GARBAGE)
async def test_a_garbage_traceparent_makes_a_new_trace_not_a_failed_task(
    natrio_worker_factory: WorkerFactory,
    natrio_connection: natrio.Connection,
    traces: Traces,
    value: str,
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)
    inside: list[trace.SpanContext] = []

    @worker.handle("raw")
    async def raw(ctx: natrio.TaskContext) -> bytes:
        inside.append(trace.get_current_span().get_span_context())
        return b"fine"

    await natrio_worker_factory.start(worker)
    # A raw publish, as any NATS client could make it.
    plain = natrio.Client(natrio_connection)
    await plain.js.publish(
        "natrio.task.raw.default.r5.s",
        b"",
        headers={
            "Nats-Msg-Id": "raw-r5",
            "traceparent": value,
            "tracestate": "k=v,\u00e9=\u00e9,,===",
        },
    )
    assert await plain.handle("raw", "r5", "s").result() == b"fine"
    (execution,) = await traces.wait_for("natrio.execute raw")
    assert execution.parent is None  # a root: the field was rejected
    assert (execution.attributes or {})["natrio.outcome"] == "completed"
    assert [c.span_id for c in inside] == [span_id(execution)]
    completed = await stored_event(
        natrio_connection, wire.event_subject("raw", "r5", "s", "completed")
    )
    # natrio publishes the trace fields it made, never the ones it was given.
    assert completed.header("traceparent") == traceparent(execution)
    assert completed.header("tracestate") is None


async def test_trace_fields_are_read_whatever_their_case(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)

    @worker.handle("cased")
    async def cased(ctx: natrio.TaskContext) -> None:
        return None

    await natrio_worker_factory.start(worker)
    remote = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    plain = natrio.Client(natrio_connection)
    await plain.js.publish(
        "natrio.task.cased.default.r6.s",
        b"",
        headers={"Nats-Msg-Id": "cased-r6", "Traceparent": remote, "TraceState": "vendor=x"},
    )
    await plain.handle("cased", "r6", "s").result()
    (execution,) = await traces.wait_for("natrio.execute cased")
    assert execution.parent is not None
    assert (execution.parent.trace_id, execution.parent.span_id) == (
        int("ab" * 16, 16),
        int("cd" * 8, 16),
    )
    completed = await stored_event(
        natrio_connection, wire.event_subject("cased", "r6", "s", "completed")
    )
    assert completed.header("tracestate") == "vendor=x"  # carried on by the span's context


async def test_a_task_moved_into_its_partition_keeps_only_a_valid_context(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)

    @worker.handle("part", partitions=2)
    async def part(ctx: natrio.TaskContext) -> None:
        return None

    await natrio_worker_factory.start(worker)
    remote = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"
    plain = natrio.Client(natrio_connection)
    # Published without their partition (as a client that knows nothing of them would).
    for run_id, value in (("good", remote), ("bad", "00-nonsense")):
        await plain.js.publish(
            f"natrio.task.part.default.{run_id}.s",
            b"",
            headers={"Nats-Msg-Id": f"part-{run_id}", "traceparent": value},
        )
        await plain.handle("part", run_id, "s").result()
    spans = await traces.wait_for("natrio.execute part", 2)
    by_run = {(s.attributes or {})["natrio.run_id"]: s for s in spans}
    good, bad = by_run["good"], by_run["bad"]
    assert good.parent is not None
    assert (good.parent.trace_id, good.parent.span_id) == (int("12" * 16, 16), int("34" * 8, 16))
    assert bad.parent is None


async def test_metrics_count_executions_per_task_type(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry, retry=FAST_RETRY)

    @worker.handle("ok")
    async def ok(ctx: natrio.TaskContext) -> None:
        return None

    @worker.handle("flaky")
    async def flaky(ctx: natrio.TaskContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("again")

    @worker.handle("doomed")
    async def doomed(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("never")

    await natrio_worker_factory.start(worker)
    client = natrio.Client(natrio_connection)
    await (await client.submit("ok")).result()
    await (await client.submit("ok")).result()
    await (await client.submit("flaky")).result()
    with pytest.raises(natrio.TaskFailed):
        await (await client.submit("doomed")).result()
    await traces.wait_for("natrio.execute doomed")

    points = traces.metrics()

    def value(name: str, task_type: str, outcome: str | None = None) -> Any:
        attributes = {"natrio.task_type": task_type}
        if outcome is not None:
            attributes["natrio.outcome"] = outcome
        return points.get((name, tuple(sorted(attributes.items()))))

    assert [value("natrio.task.started", t) for t in ("ok", "flaky", "doomed")] == [2, 2, 1]
    assert value("natrio.task.succeeded", "ok", "completed") == 2
    assert value("natrio.task.succeeded", "flaky", "completed") == 1
    assert value("natrio.task.failed", "flaky") == 1
    assert value("natrio.task.retried", "flaky") == 1
    assert value("natrio.task.failed", "doomed") == 1
    assert value("natrio.task.dead", "doomed") == 1
    assert value("natrio.task.retried", "doomed") is None
    for task_type in ("ok", "flaky", "doomed"):
        assert value("natrio.task.in_flight", task_type) == 0
    assert value("natrio.task.duration", "ok", "completed") == 2
    assert value("natrio.task.duration", "flaky", "retried") == 1
    assert value("natrio.task.duration", "doomed", "dead") == 1
    # The same counts as the worker's own statistics.
    stats = worker.statistics().dispatcher
    assert (stats.processed, stats.failed, stats.retried, stats.dead) == (3, 2, 1, 1)


async def test_a_task_dead_before_it_ran_gets_a_span(
    natrio_worker_factory: WorkerFactory, natrio_connection: natrio.Connection, traces: Traces
) -> None:
    worker = natrio_worker_factory(telemetry=traces.telemetry)
    ran: list[str] = []

    @worker.handle("late")
    async def late(ctx: natrio.TaskContext) -> None:
        ran.append(ctx.run_id)

    client = natrio.Client(natrio_connection, telemetry=traces.telemetry)
    handle = await client.submit("late", run_id="r7", deadline=0.05)
    await trio.sleep(0.2)
    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed):
        await handle.result()
    assert ran == []
    (execution,) = await traces.wait_for("natrio.execute late")
    (submit,) = traces.spans("natrio.submit late")
    assert parent_id(execution) == span_id(submit)
    assert (execution.attributes or {})["natrio.outcome"] == "dead"
    assert execution.status.status_code is StatusCode.ERROR
    dead = await stored_event(
        natrio_connection, wire.event_subject("late", "r7", handle.step_id, "dead")
    )
    assert dead.header("traceparent") == traceparent(execution)


async def test_the_option_is_checked(natrio_connection: natrio.Connection) -> None:
    for wrong in ("yes", 1, object()):
        with pytest.raises(natrio.ConfigurationError, match="telemetry must be"):
            natrio.Worker(natrio_connection, telemetry=wrong)  # type: ignore[arg-type]
        with pytest.raises(natrio.ConfigurationError, match="telemetry must be"):
            natrio.Client(natrio_connection, telemetry=wrong)  # type: ignore[arg-type]
    # True: the global providers (no-op ones here, so nothing is recorded, but it runs).
    natrio.Worker(natrio_connection, telemetry=True)
    natrio.Client(natrio_connection, telemetry=True)


WITHOUT_OPENTELEMETRY = textwrap.dedent(
    """
    import importlib.abc
    import sys

    tried = []

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        # As if the extra were not installed, and telling whether natrio tried.
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                tried.append(name)
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())

    import trio
    import natrio

    async def main():
        async with natrio.embedded_server() as server, natrio.connect(server.url) as nc:
            await natrio.provision(nc)
            worker = natrio.Worker(nc, freeze_gc=False)

            @worker.handle("echo")
            async def echo(ctx):
                return ctx.input

            async with natrio.open_worker(worker, grace=0):
                handle = await natrio.Client(nc).submit("echo", b"works")
                assert await handle.result() == b"works"
            for option in (natrio.Worker, natrio.Client):
                try:
                    option(nc, telemetry=True)
                except natrio.ConfigurationError as exc:
                    assert "natrio[otel]" in str(exc), exc
                else:
                    raise AssertionError("telemetry=True without OpenTelemetry")

    trio.run(main)
    assert "natrio.otel" not in sys.modules
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    assert not loaded, loaded
    # Only the two telemetry=True above looked for it.
    assert tried and all(name == "opentelemetry" for name in tried), tried
    try:
        import natrio.otel
    except ImportError as exc:
        assert "natrio[otel]" in str(exc), exc
    else:
        raise AssertionError("natrio.otel imported without OpenTelemetry")
    print("ok")
    """
)


def test_natrio_neither_imports_nor_needs_opentelemetry_without_telemetry() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPENTELEMETRY],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok"
