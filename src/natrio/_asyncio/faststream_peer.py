"""The FastStream peer ``natrio bench`` measures natrio against (faststream[nats] 0.7).

A FastStream app as its users write one, run without the FastStream CLI (``broker.start()``
on asyncio's own event loop, SIGTERM handled as the CLI would: a graceful stop):

- a ``NatsBroker`` whose per-message log lines ("Received", "Processed") are emitted at
  DEBUG, below its default logger's INFO level, so none is formatted (errors still are);
- one subscriber bound to natrio's durable consumer (``workload.CONSUMER``) on the
  work-queue stream, declared with ``JStream(..., declare=False)`` so FastStream never
  creates or updates a stream (the consumer exists, so nats-py's ``pull_subscribe`` only
  looks it up), pulling with ``PullSub(batch_size=--batch)``. Without ``--max-workers``
  FastStream runs every message of a fetched batch at once and fetches the next batch
  when all of them are done; with ``--max-workers K`` its concurrent subscriber keeps
  up to K handlers running;
- a typed handler: FastStream decodes the JSON body into a pydantic ``Job``, the no-op
  makes a ``JobDone``, and ``broker.publish(..., stream=EVENT_STREAM)`` stores it as the
  completion event and awaits its PubAck. FastStream's default ack policy
  (``AckPolicy.REJECT_ON_ERROR``) acks after the handler returns and terminates the
  message (``term``) when the handler raises.

Commands (``python -m natrio._asyncio.faststream_peer <command> --url URL ...``), each
printing its figures as one JSON line (``workload.emit``):

- ``drain --count N [--batch B] [--max-workers K]``: drain N queued tasks, measured from
  just before the subscriber starts until FastStream's graceful stop returned (every
  handler finished, hence acked, and the connection drained);
- ``roundtrip-worker``: serve the same handler; print ``ready`` once it pulls; stop at
  the end of stdin or on SIGTERM;
- ``roundtrip-client --count N --warmup W --round R``: W+N sequential
  ``broker.request(..., stream=TASK_STREAM)`` calls: FastStream stores the task in the
  task stream with a ``reply_to`` header, the worker's handler runs (completion event
  stored first), FastStream publishes its return value to that inbox, then acks.

Import FastStream only inside functions: the bench imports :func:`task_message` in its own
process, which has neither FastStream nor pydantic.
"""

# No ``from __future__ import annotations`` here: FastStream (fast_depends) reads the
# handler's annotations, and those name classes local to ``_worker_broker``, which string
# annotations resolved against the module's globals would not find.

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _wire as wire
from .._bench import workload
from . import plain

if TYPE_CHECKING:
    from faststream.nats import NatsBroker

#: Seconds a JetStream publish (event or request) waits for its PubAck: nats-py's own
#: default, where FastStream's ``broker.publish`` would wait 0.5 s and, under a backlog,
#: time out a store that was on its way (and then terminate the task).
_PUBLISH_TIMEOUT = 5.0
#: Seconds a round trip waits for its answer.
_REQUEST_TIMEOUT = 5.0


def task_message(round_: str, n: int) -> tuple[str, bytes, dict[str, str]]:
    """The ``n``-th task of ``round_`` as the bench prefills it: subject, payload, headers.

    FastStream decodes a body without a content-type as JSON, so natrio's own task
    messages are what a FastStream producer would send (less its content-type header).
    """
    return (
        workload.task_subject(round_, n),
        workload.task_payload(n),
        workload.task_headers(round_, n),
    )


def _worker_broker(
    url: str, batch: int, max_workers: int | None, on_done: Callable[[], None]
) -> "NatsBroker":
    """A broker whose one subscriber runs the typed no-op; ``on_done`` after each event."""
    from faststream.nats import JStream, NatsBroker, PullSub

    from .peer_models import Job, JobDone

    broker = NatsBroker(url, log_level=logging.DEBUG)
    worker = f"faststream-{os.getpid()}"

    @broker.subscriber(
        workload.FILTER,
        stream=JStream(name=wire.TASK_STREAM, declare=False),
        durable=workload.CONSUMER,
        pull_sub=PullSub(batch_size=batch),
        max_workers=max_workers,
    )
    async def noop(job: Job) -> JobDone:
        output = JobDone(n=job.n, ok=True)
        # The message from FastStream's context, not a ``msg: NatsMessage`` parameter:
        # fast_depends resolves that one in a worker thread, per message (a third more
        # CPU per task); a tuned deployment reads the context.
        raw = broker.context.get_local("message").raw_message
        subject, headers = workload.completion(raw.reply, raw.subject, worker)
        await broker.publish(
            output, subject, headers=headers, stream=wire.EVENT_STREAM, timeout=_PUBLISH_TIMEOUT
        )
        on_done()
        return output

    return broker


def _stop_on_sigterm(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM, as the FastStream CLI stops an app gracefully."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)


async def drain(url: str, count: int, batch: int, max_workers: int | None) -> dict[str, Any]:
    """Drain ``count`` queued tasks with the FastStream subscriber."""
    done = 0
    stop = asyncio.Event()

    def on_done() -> None:
        nonlocal done
        done += 1
        if done == count:
            stop.set()

    broker = _worker_broker(url, batch, max_workers, on_done)
    _stop_on_sigterm(stop)
    await broker.connect()
    meter = workload.Meter()
    await broker.start()
    await stop.wait()
    # The last handler's ack comes after it returned; the graceful stop waits for every
    # running handler to finish (ack included) and drains the connection.
    await broker.stop()
    figures = meter.figures(done)
    knobs = {"batch": batch, "max_workers": max_workers}
    return figures | knobs if done == count else figures | knobs | {"interrupted": True}


async def roundtrip_worker(url: str, batch: int, max_workers: int | None) -> dict[str, Any]:
    """Serve the typed no-op until the end of stdin or SIGTERM."""
    processed = 0
    stop = asyncio.Event()

    def on_done() -> None:
        nonlocal processed
        processed += 1

    broker = _worker_broker(url, batch, max_workers, on_done)
    _stop_on_sigterm(stop)
    await broker.connect()
    await broker.start()
    workload.emit({"ready": True})
    plain.set_at_end_of_stdin(stop)
    await stop.wait()
    await broker.stop()
    return {"processed": processed, "batch": batch, "max_workers": max_workers}


async def roundtrip_client(url: str, count: int, warmup: int, round_: str) -> dict[str, Any]:
    """``warmup`` + ``count`` sequential JetStream requests; the latencies of the last ``count``."""
    from faststream.nats import NatsBroker

    latencies: list[float] = []
    async with NatsBroker(url, log_level=logging.DEBUG) as broker:
        for n in range(warmup + count):
            subject = workload.task_subject(round_, n)
            job = {"n": n, "name": f"job-{n}", "size": 640}
            started = time.perf_counter()
            response = await broker.request(
                job,
                subject,
                headers=workload.task_headers(round_, n),
                stream=wire.TASK_STREAM,
                timeout=_REQUEST_TIMEOUT,
            )
            answer = await response.decode()
            elapsed = time.perf_counter() - started
            if not isinstance(answer, dict) or answer.get("n") != n:
                raise RuntimeError(f"task {n} was answered with {answer!r}")
            if n >= warmup:
                latencies.append(elapsed)
    return {"latencies": latencies, "warmup": warmup}


def main(argv: list[str] | None = None) -> None:
    """Run one command and print its figures (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m natrio._asyncio.faststream_peer")
    parser.add_argument("name", choices=["drain", "roundtrip-worker", "roundtrip-client"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--round", dest="round_", default="rt")
    args = parser.parse_args(argv)
    rss_start = workload.rss_bytes()
    figures: dict[str, Any]
    if args.name == "drain":
        figures = plain.run(drain(args.url, args.count, args.batch, args.max_workers))
    elif args.name == "roundtrip-worker":
        figures = plain.run(roundtrip_worker(args.url, args.batch, args.max_workers))
    else:
        figures = plain.run(roundtrip_client(args.url, args.count, args.warmup, args.round_))
    workload.emit(figures | {"rss_start": rss_start, "rss_end": workload.rss_bytes()})


if __name__ == "__main__":
    main()
