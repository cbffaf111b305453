"""Bounded shutdown, immediate hand-over of unfinished tasks, and crashes mid-task."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

import natrio
from natrio.testing import WorkerFactory

from .helpers import consumer_state, event_counts


def holding_worker(
    nc: natrio.Connection,
    started: list[str],
    cancelled: list[str],
    two_started: trio.Event,
    **options: object,
) -> natrio.Worker:
    worker = natrio.Worker(nc, **options)  # type: ignore[arg-type]

    @worker.handle("hold")
    async def hold(ctx: natrio.TaskContext) -> bytes:
        started.append(ctx.run_id)
        if len(started) == 2:
            two_started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(ctx.run_id)
            raise
        return b""  # pragma: no cover

    return worker


def finishing_worker(
    factory: WorkerFactory, seen: list[tuple[str, int, float]], ack_wait: float = 30.0
) -> natrio.Worker:
    # The consumer is shared by every worker of a task type, so its ack_wait must match.
    worker = factory(ack_wait=ack_wait)

    @worker.handle("hold")
    async def hold(ctx: natrio.TaskContext) -> bytes:
        seen.append((ctx.run_id, ctx.attempt, trio.current_time()))
        return b"finished"

    return worker


async def test_stop_is_bounded_and_unfinished_tasks_move_at_once(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    started: list[str] = []
    cancelled: list[str] = []
    two_started = trio.Event()
    worker = holding_worker(
        natrio_connection, started, cancelled, two_started, concurrency=2, prefetch=10
    )
    handles = [await natrio_client.submit("hold", run_id=f"r{i}") for i in range(6)]
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        with trio.fail_after(5):
            await two_started.wait()
        stop_at = trio.current_time()
        worker.stop(grace=0.5)
    stopped_in = trio.current_time() - stop_at
    assert 0.5 <= stopped_in < 0.5 + 1.0
    assert sorted(cancelled) == sorted(started)
    # ack_wait is 30 s: only NAKs can make these tasks available to another worker now.
    seen: list[tuple[str, int, float]] = []
    other = finishing_worker(natrio_worker_factory, seen)
    await natrio_worker_factory.start(other)
    ready_at = trio.current_time()
    results = [await h.result() for h in handles]
    assert results == [b"finished"] * 6
    assert max(t for _, _, t in seen) - ready_at < 1.0
    # Handed back by a shutdown, not failed: still the first attempt.
    assert {run_id for run_id, attempt, _ in seen if attempt == 1} >= set(started)
    assert sum((await event_counts(natrio_connection, "completed")).values()) == 6
    assert await natrio.list_workers(natrio_connection) == [
        w for w in await natrio.list_workers(natrio_connection) if w.worker_id == other.worker_id
    ]


async def test_cancelling_the_enclosing_scope_gives_handlers_their_grace(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    worker = natrio.Worker(natrio_connection, shutdown_grace=1.0)
    began = trio.Event()

    @worker.handle("short")
    async def short(ctx: natrio.TaskContext) -> bytes:
        began.set()
        await trio.sleep(0.3)
        return b"made it"

    handle = await natrio_client.submit("short")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await began.wait()
            cancel_at = trio.current_time()
            scope.cancel()
    assert trio.current_time() - cancel_at < 1.0 + 1.0
    # The handler finished inside the grace period instead of being cut off.
    assert await handle.result() == b"made it"


async def test_long_handler_is_kept_alive(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory()
    runs = 0

    @worker.handle("long", ack_wait=0.6)
    async def long(ctx: natrio.TaskContext) -> bytes:
        nonlocal runs
        runs += 1
        await trio.sleep(2.0)  # over three times ack_wait
        return b"done"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("long")).result() == b"done"
    info = await natrio_client.js.consumer_info("NATRIO_TASKS", "long~default")
    assert runs == 1
    assert info["num_redelivered"] == 0


@asynccontextmanager
async def worker_process(url: str, *, ack_wait: float, grace: float) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.proc_worker", url, str(ack_wait), str(grace)],
        stdout=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def read_line(process: trio.Process, prefix: str, buffer: bytearray) -> str:
    """The next stdout line starting with ``prefix``."""
    assert process.stdout is not None
    with trio.fail_after(20):
        while True:
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                if line.decode().startswith(prefix):
                    return line.decode()
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"worker process ended before printing {prefix!r}")
            buffer.extend(chunk)


async def submit_then_kill(
    url: str,
    client: natrio.Client,
    task_type: str,
    line: str,
    *,
    run_id: str,
    step_id: str | None = None,
    payload: bytes = b"",
    before_kill: Callable[[natrio.TaskHandle], Awaitable[None]] | None = None,
) -> tuple[natrio.TaskHandle, str]:
    """Submit a task to a worker process (ack_wait 1 s) and SIGKILL the process once it
    prints ``line``; returns the handle and that line."""
    buffer = bytearray()
    async with worker_process(url, ack_wait=1.0, grace=0.0) as process:
        await read_line(process, "READY", buffer)
        handle = await client.submit(task_type, payload, run_id=run_id, step_id=step_id)
        seen = await read_line(process, line, buffer)
        if before_kill is not None:
            await before_kill(handle)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    return handle, seen


async def test_sigkilled_worker_task_completes_elsewhere_exactly_once(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    handle, started = await submit_then_kill(
        natrio_server.url, natrio_client, "hold", "STARTED", run_id="victim"
    )
    assert started.split() == ["STARTED", "victim", "1"]
    seen: list[tuple[str, int, float]] = []
    await natrio_worker_factory.start(finishing_worker(natrio_worker_factory, seen, ack_wait=1.0))
    assert await handle.result() == b"finished"
    assert [(run_id, attempt) for run_id, attempt, _ in seen] == [("victim", 2)]
    assert await event_counts(natrio_connection, "completed") == {
        "natrio.event.hold.victim.hold.completed": 1
    }
    assert await consumer_state(natrio_connection, "hold") == {"ack_pending": 0, "pending": 0}


async def test_crash_between_completion_event_and_ack(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    async def store_completion(handle: natrio.TaskHandle) -> None:
        # The state a crash right after the completion event was stored leaves behind.
        assert handle.seq is not None
        await natrio_client.js.publish(
            "natrio.event.hold.r.s.completed",
            b"from the first run",
            headers={
                "Nats-Msg-Id": f"c:hold:r:s:{handle.seq}",
                "Natrio-Task-Seq": str(handle.seq),
                "Natrio-Outcome": "completed",
            },
        )

    handle, _ = await submit_then_kill(
        natrio_server.url,
        natrio_client,
        "hold",
        "STARTED",
        run_id="r",
        step_id="s",
        before_kill=store_completion,
    )
    seen: list[tuple[str, int, float]] = []
    acks = await natrio_connection.subscribe("$JS.ACK.NATRIO_TASKS.>")
    await natrio_worker_factory.start(finishing_worker(natrio_worker_factory, seen, ack_wait=1.0))
    assert await handle.result() == b"from the first run"
    with trio.fail_after(5):
        assert (await acks.receive()).data == b"+ACK"
    assert await consumer_state(natrio_connection, "hold") == {"ack_pending": 0, "pending": 0}
    assert seen == []  # recognised as done: not run again
    assert await event_counts(natrio_connection, "completed") == {
        "natrio.event.hold.r.s.completed": 1
    }


async def test_sigterm_exits_within_grace_and_hands_over(
    natrio_server: natrio.EmbeddedServer,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    buffer = bytearray()
    async with worker_process(natrio_server.url, ack_wait=30.0, grace=0.5) as process:
        await read_line(process, "READY", buffer)
        handle = await natrio_client.submit("hold", run_id="t")
        await read_line(process, "STARTED", buffer)
        signalled = trio.current_time()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(0.5 + 1.0 + 1.0):  # grace + 1 s, plus interpreter exit
            assert await process.wait() == 0
    seen: list[tuple[str, int, float]] = []
    await natrio_worker_factory.start(finishing_worker(natrio_worker_factory, seen))
    ready = trio.current_time()
    assert await handle.result() == b"finished"
    assert seen[0][:2] == ("t", 1)
    assert seen[0][2] - ready < 1.0
    assert ready - signalled < 30  # well before AckWait would have released it
