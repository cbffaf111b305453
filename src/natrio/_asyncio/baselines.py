"""The plain nats-py programs ``natrio bench`` measures natrio against (asyncio, no Trio).

- ``drain-a``: a worker as people write it: ``js.pull_subscribe`` + ``fetch(batch)``,
  decode, the no-op, ``js.publish`` of the completion event (awaited), ``ack``.
- ``drain-b``: the leanest plain nats-py loop: a continuous pull on a callback
  subscription whose callback only enqueues, messages taken in batches, completion events
  with ``js.publish_async`` awaited per batch, ``+ACK`` per batch, a new pull once half the
  window is free.
- ``drain-b-same``: the same loop sending natrio's message set: a ``started`` event
  before each handler and a reply after each ack.
- ``echo`` / ``request``: core NATS request/reply, the floor of any round trip.

Each does exactly the work a natrio worker does for the same task (see
``natrio._bench.workload``): the same decode and encode, the same completion event and
headers, and the ack only after the event is stored. Each runs on asyncio's own event
loop (``plain.run``), not the trio-asyncio one importing natrio installs. Run one with
``python -m natrio._asyncio.baselines <name> --url URL [--count N]``; it prints its
figures as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import nats
import nats.errors

from .. import _wire as wire
from .._bench.workload import (
    CONSUMER,
    FILTER,
    Job,
    JobDone,
    Meter,
    completion,
    emit,
    rss_bytes,
)
from .._codec import decode, encode
from . import plain

_NS = 1_000_000_000


async def noop(job: Job) -> JobDone:
    """The handler every contestant runs."""
    return JobDone(job.n, True)


async def drain_a(url: str, count: int, batch: int) -> dict[str, Any]:
    """Baseline A: fetch a batch, then for each task publish its event, await it, ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    worker = f"baseline-a-{os.getpid()}"
    psub = await js.pull_subscribe(FILTER, durable=CONSUMER, stream=wire.TASK_STREAM)
    done = 0
    meter = Meter()
    while done < count:
        try:
            msgs = await psub.fetch(batch, timeout=5)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            output = await noop(decode(msg.data, Job))
            subject, headers = completion(msg.reply, msg.subject, worker)
            await js.publish(subject, encode(output), headers=headers)
            await msg.ack()
            done += 1
    await nc.flush()
    figures = meter.figures(done)
    await nc.close()
    return figures | {"batch": batch}


async def drain_b(url: str, count: int, window: int, same: bool = False) -> dict[str, Any]:
    """Baseline B, the leanest loop: continuous pull, batches, events awaited per batch.

    The inbox callback only enqueues; the main task takes what has arrived as one batch,
    decodes, runs and encodes each task, publishes its completion event with
    ``publish_async``, pulls again once half the window is free, awaits the batch's PubAcks
    and acks the batch. With ``same`` (B-same) it also sends what natrio sends per task: a
    ``started`` event before the handler and a reply after the ack.
    """
    nc = await nats.connect(url)
    js = nc.jetstream()
    worker = f"baseline-b-{os.getpid()}"
    inbox = nc.new_inbox()
    pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{wire.TASK_STREAM}.{CONSUMER}"
    options = {"expires": 30 * _NS, "idle_heartbeat": 5 * _NS}
    arrived: list[Any] = []
    wake = asyncio.Event()
    requested = held = done = 0

    async def on_message(msg: Any) -> None:
        arrived.append(msg)
        wake.set()

    async def pull() -> None:
        nonlocal requested
        free = window - held - requested
        if free >= window // 2 or (free > 0 and requested == 0):
            requested += free
            body = json.dumps(dict(options, batch=free)).encode()
            await nc.publish(pull_subject, body, reply=inbox)

    sub = await nc.subscribe(inbox, cb=on_message)
    meter = Meter()
    await pull()
    while done < count:
        await wake.wait()
        wake.clear()
        batch = arrived[:]
        arrived.clear()
        futures = []
        acks = []
        for msg in batch:
            headers = msg.headers
            if headers and "Status" in headers:
                if headers["Status"] in ("404", "408", "409"):
                    left = headers.get("Nats-Pending-Messages")
                    requested = max(0, requested - int(left)) if left else 0
                continue
            requested -= 1
            subject, event_headers = completion(msg.reply, msg.subject, worker)
            if same:
                started_subject = subject.rsplit(".", 1)[0] + "." + wire.STARTED
                await nc.publish(started_subject, b"", headers=_started_headers(event_headers))
            output = encode(await noop(decode(msg.data, Job)))
            futures.append(await js.publish_async(subject, output, headers=event_headers))
            acks.append((msg.reply, output, event_headers))
        held += len(acks)
        await pull()
        await asyncio.gather(*futures)
        for reply, output, event_headers in acks:
            await nc.publish(reply, b"+ACK")
            if same:
                await nc.publish(f"{inbox}.reply", output, headers=event_headers)
        held -= len(acks)
        done += len(acks)
        await pull()
    await nc.flush()
    figures = meter.figures(done)
    await sub.unsubscribe()
    await nc.close()
    return figures | {"window": window, "same": same}


def _started_headers(completion_headers: dict[str, str]) -> dict[str, str]:
    # natrio's started event carries the task's sequence, attempt and worker, no msg id.
    keep = (wire.H_TASK_SEQ, wire.H_ATTEMPT, wire.H_WORKER)
    return {name: completion_headers[name] for name in keep}


async def echo(url: str) -> dict[str, Any]:
    """The responder of the floor: answer every request on ``bench.echo`` with its payload.

    Prints a ``ready`` line once subscribed, then serves until SIGTERM or the end of its
    stdin (how the bench stops it, as it does natrio's ``roundtrip-worker``).
    """
    nc = await nats.connect(url)

    async def respond(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=respond)
    await nc.flush()
    emit({"ready": True})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    await nc.close()
    return {"stopped": True}


async def request(url: str, count: int, warmup: int) -> dict[str, Any]:
    """The requester of the floor: ``count`` sequential requests, each one's latency."""
    nc = await nats.connect(url)
    payload = encode(Job(0, "job-0", 640))
    latencies = []
    for i in range(warmup + count):
        started = time.perf_counter()
        await nc.request("bench.echo", payload, timeout=5)
        if i >= warmup:
            latencies.append(time.perf_counter() - started)
    await nc.close()
    return {"latencies": latencies}


def main(argv: list[str] | None = None) -> None:
    """Run one baseline and print its figures (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m natrio._asyncio.baselines")
    parser.add_argument("name", choices=["drain-a", "drain-b", "drain-b-same", "echo", "request"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    rss_start = rss_bytes()
    if args.name == "echo":
        figures = plain.run(echo(args.url))
    elif args.name == "drain-a":
        figures = plain.run(drain_a(args.url, args.count, args.batch))
    elif args.name in ("drain-b", "drain-b-same"):
        same = args.name == "drain-b-same"
        figures = plain.run(drain_b(args.url, args.count, args.batch, same))
    else:
        figures = plain.run(request(args.url, args.count, args.warmup))
    emit(figures | {"rss_start": rss_start, "rss_end": rss_bytes()})


if __name__ == "__main__":
    main()
