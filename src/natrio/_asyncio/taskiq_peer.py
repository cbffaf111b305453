"""The taskiq + taskiq-nats peer ``natrio bench`` measures natrio against (asyncio).

A taskiq-nats ``PullBasedJetStreamBroker`` bound to the bench's task stream and durable
consumer, a typed task (a pydantic ``Job`` in, a ``JobDone`` out, parsed by taskiq from
the annotations), and a result backend that stores each result as the completion event
on the events stream with an awaited JetStream publish. The worker side is the receiver
exactly as ``taskiq worker`` builds it (acks after the result is saved, its default), with
taskiq's logging at WARNING as a tuned deployment runs it.

What taskiq-nats does not let us configure is overridden, and nothing more:

- ``_add_or_reuse_stream``: taskiq-nats always calls ``add_stream``; here it does nothing,
  the stream is the bench's.
- ``_startup_consumer``: taskiq-nats calls ``add_consumer`` with its own config, then
  ``pull_subscribe``; here it only binds (``pull_subscribe_bind``) to the bench's consumer.
- ``kick``: taskiq-nats publishes every task to one subject with the labels as headers;
  here each task goes to its natrio task subject, derived from its task id (the run id),
  with a ``Nats-Msg-Id`` added to those headers.

Commands (each prints its figures as one JSON line, see ``workload.emit``)::

    python -m natrio._asyncio.taskiq_peer drain --url URL --count N [--max-async-tasks K] [--batch B]
    python -m natrio._asyncio.taskiq_peer roundtrip-worker --url URL [--max-async-tasks K]
    python -m natrio._asyncio.taskiq_peer roundtrip-client --url URL --count N --warmup W --round R

Each command runs on asyncio's own event loop (:func:`natrio._asyncio.plain.run`), not on
the trio-asyncio one that importing natrio would otherwise give ``asyncio.run``. taskiq is
imported only inside functions, so the bench can import :func:`task_message` without it.
"""

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import _wire as wire
from .._bench import workload
from . import plain

if TYPE_CHECKING:
    from pydantic import BaseModel
    from taskiq import AsyncTaskiqDecoratedTask, BrokerMessage
    from taskiq_nats import PullBasedJetStreamBroker

#: The taskiq name of the no-op task.
TASK_NAME = "natrio.bench.noop"
# `taskiq worker --max-async-tasks` default.
_MAX_ASYNC_TASKS = 100
# taskiq-nats' default `pull_consume_batch` is 1; the drain pulls like the other contestants.
_DRAIN_BATCH = 256
# `taskiq worker --shutdown-timeout` default.
_SHUTDOWN_TIMEOUT = 5.0
# Carries TaskiqResult.execution_time, which the event's body (the output) does not.
_H_EXECUTION_TIME = "Taskiq-Execution-Time"
# A broker made only to build task bytes never connects anywhere.
_UNUSED_URL = "nats://127.0.0.1:4222"


class _App(NamedTuple):
    broker: "PullBasedJetStreamBroker"
    noop: "AsyncTaskiqDecoratedTask[..., Any]"
    job: "type[BaseModel]"


class _Stored:
    """Counts the completion events stored; sets ``finished`` once ``target`` are."""

    def __init__(self, target: int | None = None) -> None:
        self.done = 0
        self.target = target
        self.finished = asyncio.Event()

    def __call__(self) -> None:
        self.done += 1
        if self.target is not None and self.done >= self.target:
            self.finished.set()


def _task_subject(task_id: str) -> str:
    """The natrio task subject of a task whose taskiq id is its run id."""
    return wire.task_subject(workload.TASK_TYPE, workload.GROUP, task_id, workload.TASK_TYPE)


def _task_headers(message: "BrokerMessage") -> dict[str, str]:
    """The headers taskiq-nats puts on a task (its labels) plus the bench's ``Nats-Msg-Id``."""
    headers = {key: str(value) for key, value in message.labels.items()}
    headers[wire.H_MSG_ID] = wire.task_msg_id(
        workload.TASK_TYPE, message.task_id, workload.TASK_TYPE
    )
    return headers


def _event_subject(task_id: str, kind: str) -> str:
    return wire.event_subject(workload.TASK_TYPE, task_id, workload.TASK_TYPE, kind)


def _build(url: str, batch: int, on_stored: Callable[[], None], worker: str) -> _App:
    """The broker, its result backend and the typed no-op task, as a taskiq app declares them."""
    import nats.js.errors
    import pydantic_core
    from taskiq import AsyncResultBackend, BrokerMessage, ResultGetError, TaskiqResult
    from taskiq_nats import PullBasedJetStreamBroker

    from .peer_models import Job, JobDone

    class Broker(PullBasedJetStreamBroker):
        async def _add_or_reuse_stream(self) -> None:
            """Leave the stream alone: it is the bench's, bound to by name."""

        async def _startup_consumer(self) -> None:
            """Bind to the bench's durable consumer instead of creating one."""
            self.consumer = await self.js.pull_subscribe_bind(
                durable=self.durable, stream=self.stream_name
            )

        async def kick(self, message: BrokerMessage) -> None:
            """Publish a task to its own subject, deduplicated by ``Nats-Msg-Id``."""
            await self.js.publish(
                _task_subject(message.task_id),
                payload=message.message,
                headers=_task_headers(message),
            )

    class EventBackend(AsyncResultBackend[Any]):
        """Results as natrio outcome events on the events stream, read back by direct get."""

        def __init__(self, broker: Broker) -> None:
            self.broker = broker

        async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
            """Store the outcome event; the receiver acks the task only once this returns."""
            if result.is_err:
                kind = wire.FAILED
                body = self.broker.serializer.dumpb(result.model_dump(mode="json"))
            else:
                kind = wire.COMPLETED
                body = pydantic_core.to_json(result.return_value)
            headers = {
                wire.H_WORKER: worker,
                # The task's stream sequence is not known here: every task id is new.
                wire.H_MSG_ID: wire.outcome_msg_id(
                    kind[0], workload.TASK_TYPE, task_id, workload.TASK_TYPE, 0
                ),
                wire.H_OUTCOME: kind,
                _H_EXECUTION_TIME: repr(result.execution_time),
            }
            await self.broker.js.publish(_event_subject(task_id, kind), body, headers=headers)
            on_stored()

        async def _outcome(self, task_id: str) -> Any:
            """The task's outcome event (completed or failed), or None if there is none yet."""
            # One direct get whatever the outcome: nats-py's get_last_msg takes no wildcard.
            reply = await self.broker.client.request(
                f"$JS.API.DIRECT.GET.{wire.EVENT_STREAM}",
                json.dumps({"last_by_subj": _event_subject(task_id, "*")}).encode(),
            )
            status = (reply.headers or {}).get("Status")
            if status == "404":
                return None
            if status is not None:
                raise nats.js.errors.APIError.from_msg(reply)
            return reply

        async def is_result_ready(self, task_id: str) -> bool:
            """Whether the task's outcome event is stored."""
            return await self._outcome(task_id) is not None

        async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
            """The task's result, rebuilt from its outcome event."""
            event = await self._outcome(task_id)
            if event is None:
                raise ResultGetError
            if event.headers[wire.H_OUTCOME] == wire.FAILED:
                failed: TaskiqResult[Any] = TaskiqResult[Any].model_validate(
                    self.broker.serializer.loadb(event.data)
                )
                return failed
            return TaskiqResult(
                is_err=False,
                return_value=json.loads(event.data),
                execution_time=float(event.headers[_H_EXECUTION_TIME]),
            )

    broker = Broker(
        servers=url,
        subject=workload.FILTER,
        stream_name=wire.TASK_STREAM,
        durable=workload.CONSUMER,
        pull_consume_batch=batch,
    )
    broker.with_result_backend(EventBackend(broker))

    @broker.task(task_name=TASK_NAME)
    async def noop(job: Job) -> JobDone:
        return JobDone(n=job.n, ok=True)

    return _App(broker, noop, Job)


@functools.cache
def _message_app() -> _App:
    return _build(_UNUSED_URL, 1, lambda: None, "")


def task_message(round_: str, n: int) -> tuple[str, bytes, dict[str, str]]:
    """The ``n``-th task of a round as ``noop.kiq(Job(...))`` publishes it: subject, bytes, headers.

    Built by taskiq's own kicker and formatter (task id = run id), not by hand.
    """
    app = _message_app()
    kicker = app.noop.kicker().with_task_id(workload.run_id(round_, n))
    message = app.broker.formatter.dumps(
        kicker._prepare_message(app.job(n=n, name=f"job-{n}", size=640))
    )
    headers = _task_headers(message)
    assert headers[wire.H_MSG_ID] == workload.task_headers(round_, n)[wire.H_MSG_ID]
    return workload.task_subject(round_, n), message.message, headers


def _configure_logging() -> None:
    """What ``taskiq worker --log-level WARNING`` sets up."""
    from taskiq.cli.worker.args import WorkerArgs

    logging.basicConfig(level=logging.WARNING, format=WorkerArgs.log_format)
    logging.getLogger("taskiq").setLevel(logging.WARNING)


async def _serve(
    url: str,
    batch: int,
    max_async_tasks: int,
    stored: _Stored,
    started: Callable[[], None] = lambda: None,
) -> workload.Meter:
    """Run the worker as ``taskiq worker`` does until ``stored.finished`` is set.

    ``started`` is called once the broker is up, just before the receiver pulls; the
    returned meter was started then too.
    """
    from concurrent.futures import ThreadPoolExecutor

    from taskiq import AcknowledgeType
    from taskiq.cli.worker.run import shutdown_broker
    from taskiq.receiver import Receiver

    app = _build(url, batch, stored, f"taskiq-{os.getpid()}")
    broker = app.broker
    # As the CLI: it marks the broker before the tasks are imported and started.
    broker.is_worker_process = True
    # The CLI's signal handler only asks the receiver to stop.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stored.finished.set)
    with ThreadPoolExecutor(max_workers=None) as pool:
        # `taskiq worker`'s defaults, except run_startup: the startup (connect and bind)
        # runs first so the measured stretch starts at the first pull.
        receiver = Receiver(
            broker=broker,
            executor=pool,
            validate_params=True,
            max_async_tasks=max_async_tasks,
            max_async_tasks_jitter=0,
            max_prefetch=0,
            propagate_exceptions=True,
            run_startup=False,
            ack_type=AcknowledgeType.WHEN_SAVED,
            max_tasks_to_execute=None,
            wait_tasks_timeout=None,
        )
        try:
            await broker.startup()
            meter = workload.Meter()
            started()
            await receiver.listen(stored.finished)
            # The last acks are plain publishes: make sure they left.
            await broker.client.flush()
        finally:
            await shutdown_broker(broker, _SHUTDOWN_TIMEOUT)
    return meter


async def drain(url: str, count: int, max_async_tasks: int, batch: int) -> dict[str, Any]:
    """Drain ``count`` queued tasks with the taskiq worker; stop once all are stored and acked."""
    stored = _Stored(count)
    meter = await _serve(url, batch, max_async_tasks, stored)
    return meter.figures(stored.done) | {"max_async_tasks": max_async_tasks, "batch": batch}


async def roundtrip_worker(url: str, max_async_tasks: int, batch: int) -> dict[str, Any]:
    """Serve the no-op until stdin ends or SIGTERM; print ``ready`` once it pulls."""
    stored = _Stored()

    def started() -> None:
        plain.set_at_end_of_stdin(stored.finished)
        workload.emit({"ready": True})

    await _serve(url, batch, max_async_tasks, stored, started)
    return {"processed": stored.done, "max_async_tasks": max_async_tasks, "batch": batch}


async def roundtrip_client(url: str, count: int, warmup: int, round_: str) -> dict[str, Any]:
    """``warmup + count`` sequential ``kiq()`` + ``wait_result()``; the measured latencies."""
    from taskiq.cli.worker.run import shutdown_broker

    app = _build(url, 1, lambda: None, "")
    await app.broker.startup()
    latencies = []
    try:
        for n in range(warmup + count):
            job = app.job(n=n, name=f"job-{n}", size=640)
            started = time.perf_counter()
            task = await app.noop.kicker().with_task_id(workload.run_id(round_, n)).kiq(job)
            result = await task.wait_result(check_interval=0.001)
            elapsed = time.perf_counter() - started
            if result.is_err or result.return_value.n != n:
                raise RuntimeError(f"task {n}: unexpected result {result!r}")
            if n >= warmup:
                latencies.append(elapsed)
    finally:
        await shutdown_broker(app.broker, _SHUTDOWN_TIMEOUT)
    return {"latencies": latencies, "warmup": warmup}


def main(argv: list[str] | None = None) -> None:
    """Run one command and print its figures (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m natrio._asyncio.taskiq_peer")
    parser.add_argument("name", choices=["drain", "roundtrip-worker", "roundtrip-client"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--round", default="r")
    parser.add_argument("--max-async-tasks", type=int, default=_MAX_ASYNC_TASKS)
    # The round-trip worker keeps taskiq-nats' default batch of 1: nats-py's fetch(n > 1)
    # holds the first task until n arrive or the pull expires.
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args(argv)
    _configure_logging()
    rss_start = workload.rss_bytes()
    if args.name == "drain":
        figures = plain.run(
            drain(args.url, args.count, args.max_async_tasks, args.batch or _DRAIN_BATCH)
        )
    elif args.name == "roundtrip-worker":
        figures = plain.run(roundtrip_worker(args.url, args.max_async_tasks, args.batch or 1))
    else:
        figures = plain.run(roundtrip_client(args.url, args.count, args.warmup, args.round))
    workload.emit(figures | {"rss_start": rss_start, "rss_end": workload.rss_bytes()})


if __name__ == "__main__":
    main()
