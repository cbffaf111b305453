"""Edge cases that once went wrong: startup failures, cancellation, pauses in nurseries,
missing consumers, stale results, secrets in URLs."""

from __future__ import annotations

import logging

import pytest
import trio

import natrio
from natrio._transport.protocol import redact
from natrio.testing import WorkerFactory

from .helpers import consumer_state, event_counts


async def _echo(ctx: natrio.TaskContext) -> bytes:
    return ctx.input


async def test_startup_failure_raises_instead_of_hanging(
    natrio_connection: natrio.Connection,
) -> None:
    await natrio.Client(natrio_connection).js.api("STREAM.DELETE.KV_natrio_workers")
    worker = natrio.Worker(natrio_connection)
    worker.handle("x", _echo)
    with trio.fail_after(5), pytest.raises(natrio.NatrioError, match="provision"):
        await worker.run()


async def test_cancelled_worker_hands_back_its_prefetched_tasks(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = natrio.Worker(
        natrio_connection, concurrency=4, prefetch=64, ack_wait=60, shutdown_grace=0
    )
    began = trio.Event()

    @worker.handle("many")
    async def many(ctx: natrio.TaskContext) -> bytes:
        began.set()
        await trio.sleep(30)
        return b""

    handles = [await natrio_client.submit("many", run_id=f"r{i}") for i in range(40)]
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await began.wait()
            scope.cancel()
    # ack_wait is 60 s: only NAKs make these available now.
    other = natrio_worker_factory(ack_wait=60)
    other.handle("many", _echo)
    await natrio_worker_factory.start(other)
    with trio.fail_after(10):
        for handle in handles:
            await handle.result()
    assert await consumer_state(natrio_connection, "many") == {"ack_pending": 0, "pending": 0}


async def test_pause_from_inside_a_nursery(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    seen: list[bool] = []

    @worker.handle("nested")
    async def nested(ctx: natrio.TaskContext) -> bytes:
        seen.append(ctx.resumed)
        if not ctx.resumed:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctx.pause, 0.05)
        return b"back"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("nested")).result() == b"back"
    assert seen == [False, True]


async def test_consumer_deleted_while_no_pull_waits_is_recreated(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(concurrency=1, prefetch=1)
    release = trio.Event()
    holding = trio.Event()

    @worker.handle("t")
    async def t(ctx: natrio.TaskContext) -> bytes:
        if ctx.input == b"first":
            holding.set()
            await release.wait()
        return ctx.input

    await natrio_worker_factory.start(worker)
    first = await natrio_client.submit("t", b"first", run_id="a")
    with trio.fail_after(5):
        await holding.wait()
    # The window is full, so no pull is waiting on the server to hear "Consumer Deleted".
    await natrio_client.js.delete_consumer("NATRIO_TASKS", "t~default")
    release.set()
    with trio.fail_after(15):
        assert await (await natrio_client.submit("t", b"second", run_id="b")).result() == b"second"
    assert first.seq is not None


async def test_result_of_a_resubmitted_step_is_its_own(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with natrio.connect(natrio_server.url) as nc:
        await natrio.provision(nc, duplicate_window=0.2)
        client = natrio.Client(nc, check_interval=0.2)
        worker = natrio.Worker(nc)
        worker.handle("e", _echo)
        first = await client.submit("e", b"first", run_id="same")
        async with natrio.open_worker(worker, grace=0):
            assert await first.result() == b"first"
        await trio.sleep(0.3)  # past the duplicate window: the same step may run again
        second = await client.submit("e", b"second", run_id="same")
        assert not second.duplicate
        async with natrio.open_worker(worker, grace=0):
            assert await second.result() == b"second"


def test_redact_hides_passwords_with_at_and_slash() -> None:
    assert redact("nats://user:p@ss@host:4222") == "nats://***@host:4222"
    assert redact("nats://alice:s3cr/et@host") == "nats://***@host"
    assert redact("nats://host:4222") == "nats://host:4222"


def test_backoff_does_not_overflow() -> None:
    policy = natrio.RetryPolicy(maximum_attempts=0)
    assert policy.delay(5000) == policy.maximum_interval


async def test_shutdowns_do_not_use_up_attempts(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    attempts: list[int] = []
    started = trio.Event()

    def make_worker() -> natrio.Worker:
        worker = natrio.Worker(
            natrio_connection,
            concurrency=1,
            prefetch=4,
            retry=natrio.RetryPolicy(maximum_attempts=2),
        )

        @worker.handle("patient")
        async def patient(ctx: natrio.TaskContext) -> bytes:
            attempts.append(ctx.attempt)
            started.set()
            await trio.sleep(30)
            return b""

        return worker

    handles = [await natrio_client.submit("patient", run_id=f"p{i}") for i in range(3)]
    # Three rolling restarts: each hands its running and queued tasks back.
    for _ in range(3):
        started = trio.Event()
        worker = make_worker()
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await started.wait()
            worker.stop(grace=0)
    assert attempts == [1, 1, 1]
    assert all(not h.duplicate for h in handles)


async def test_completion_not_stored_at_first_is_retried_then_acked(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    # A pipelined completion whose publish fails (here: no events stream answers) goes the
    # retrying way, and the task is acked once the event is stored, exactly once.
    failed_once = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not stored" in record.getMessage():
                failed_once.set()

    watch = Watch(logging.DEBUG)
    dispatcher_log = logging.getLogger("natrio.dispatcher")
    dispatcher_log.addHandler(watch)
    level = dispatcher_log.level
    dispatcher_log.setLevel(logging.DEBUG)
    try:
        worker = natrio_worker_factory()
        worker.handle("e", _echo)
        await natrio_worker_factory.start(worker)
        await natrio_client.js.api("STREAM.DELETE.NATRIO_EVENTS")
        handle = await natrio_client.submit("e", b"kept", run_id="r")
        with trio.fail_after(10):
            await failed_once.wait()
            await natrio.provision(natrio_connection)
            assert await handle.result() == b"kept"
        assert await event_counts(natrio_connection, "completed") == {
            "natrio.event.e.r.e.completed": 1
        }
        assert await consumer_state(natrio_connection, "e") == {"ack_pending": 0, "pending": 0}
    finally:
        dispatcher_log.removeHandler(watch)
        dispatcher_log.setLevel(level)
