"""Tasks travel end to end: submit, handle, result, with the promises the client makes."""

from __future__ import annotations

import attrs
import pytest
import trio

import natrio
from natrio.testing import WorkerFactory

from .helpers import event_counts


@attrs.frozen
class Resize:
    url: str
    width: int


@attrs.frozen
class Resized:
    url: str


async def test_raw_round_trip(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    seen: list[natrio.TaskContext] = []

    @worker.handle("fetch")
    async def fetch(ctx: natrio.TaskContext) -> bytes:
        seen.append(ctx)
        return ctx.input.upper()

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit(
        "fetch", b"hello", run_id="r1", step_id="s1", headers={"X-Trace": "t"}
    )
    assert await handle.result() == b"HELLO"
    (ctx,) = seen
    assert (ctx.task_type, ctx.group, ctx.run_id, ctx.step_id) == ("fetch", "default", "r1", "s1")
    assert (ctx.attempt, ctx.retry_count) == (1, 0)
    assert ctx.headers["X-Trace"] == "t"
    assert ctx.worker_id == worker.worker_id


async def test_typed_round_trip(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    @worker.handle_typed("resize")
    async def resize(ctx: natrio.TaskContext, task: Resize) -> Resized:
        return Resized(url=f"{task.url}?w={task.width}")

    @worker.handle_typed("note")
    async def note(ctx: natrio.TaskContext, text: str) -> None:
        return None

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("resize", Resize("a.png", 10))
    assert await handle.result(Resized) == Resized("a.png?w=10")
    output: object = await (await natrio_client.submit("note", "hi")).result(type(None))
    assert output is None


async def test_handler_may_call_complete_itself(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    second_call: list[BaseException] = []

    @worker.handle("explicit")
    async def explicit(ctx: natrio.TaskContext) -> bytes:
        await ctx.complete(b"done")
        try:
            await ctx.fail(RuntimeError("too late"))
        except natrio.TerminalAlreadyCalled as exc:
            second_call.append(exc)
        return b"ignored"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("explicit")).result() == b"done"
    assert len(second_call) == 1


async def test_several_types_share_the_concurrency_bound(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(concurrency=3)
    running = 0
    peak = 0
    reached = trio.Event()

    async def track(ctx: natrio.TaskContext) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            reached.set()
        # Hold the slot until the bound has been reached once, so the peak is meaningful.
        with trio.move_on_after(2):
            await reached.wait()
        await trio.sleep(0.01)
        running -= 1
        return ctx.task_type.encode()

    for task_type in ("a", "b", "c"):
        worker.handle(task_type, track)
    await natrio_worker_factory.start(worker)
    handles = [
        await natrio_client.submit(t, run_id=f"r{i}") for i in range(8) for t in ("a", "b", "c")
    ]
    results = [await h.result() for h in handles]
    assert results == [h.task_type.encode() for h in handles]
    assert peak == 3


async def test_same_step_twice_is_one_task(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory()
    runs = 0

    @worker.handle("once")
    async def once(ctx: natrio.TaskContext) -> bytes:
        nonlocal runs
        runs += 1
        return b"ok"

    first = await natrio_client.submit("once", b"1", run_id="run", step_id="step")
    second = await natrio_client.submit("once", b"2", run_id="run", step_id="step")
    assert not first.duplicate
    assert second.duplicate
    await natrio_worker_factory.start(worker)
    assert await first.result() == b"ok"
    assert await second.result() == b"ok"
    assert runs == 1
    assert sum((await event_counts(natrio_connection, "completed")).values()) == 1


async def test_rebuilt_handle_in_another_connection(
    natrio_server: natrio.EmbeddedServer,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("echo")
    async def echo(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("echo", b"kept", run_id="r-9", step_id="s-9")
    await handle.result()
    # A different connection (as in a new process) rebuilds the handle from its identity.
    async with natrio.connect(natrio_server.url) as other:
        rebuilt = natrio.Client(other).handle("echo", "r-9", "s-9")
        assert await rebuilt.result() == b"kept"
        # And one for a task that finishes later still gets it, from the live events.
        pending = natrio.Client(other).handle("echo", "r-10", "s-10")
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def wait() -> None:
                got.append(await pending.result())

            nursery.start_soon(wait)
            await natrio_client.submit("echo", b"later", run_id="r-10", step_id="s-10")
        assert got == [b"later"]


async def test_payload_over_max_payload_fails_at_submit(
    natrio_client: natrio.Client, natrio_connection: natrio.Connection
) -> None:
    with pytest.raises(natrio.PayloadTooLarge, match="max_payload"):
        await natrio_client.submit("big", b"x" * (natrio_connection.max_payload + 1))


async def test_submit_without_provision_says_so(natrio_server: natrio.EmbeddedServer) -> None:
    async with natrio.connect(natrio_server.url) as nc:
        with pytest.raises(natrio.NatrioError, match="provision"):
            await natrio.Client(nc).submit("x")


async def test_provision_is_idempotent(natrio_connection: natrio.Connection) -> None:
    await natrio.provision(natrio_connection, worker_ttl=2.0)
    await natrio.provision(natrio_connection, worker_ttl=3.0, events_max_age=3600)


async def test_open_worker(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    worker = natrio.Worker(natrio_connection)

    @worker.handle("ping")
    async def ping(ctx: natrio.TaskContext) -> bytes:
        return b"pong"

    async with natrio.open_worker(worker, grace=1):
        assert await (await natrio_client.submit("ping")).result() == b"pong"
    assert not worker.statistics().running


async def test_stop_before_run_returns_once_started(natrio_connection: natrio.Connection) -> None:
    worker = natrio.Worker(natrio_connection)
    worker.handle("x", _noop)
    worker.stop(grace=0)
    with trio.fail_after(5):
        await worker.run()
    assert await natrio.list_workers(natrio_connection) == []


async def _noop(ctx: natrio.TaskContext) -> bytes:
    return b""
