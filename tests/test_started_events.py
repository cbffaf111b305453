"""What a running worker costs per task: started events only for handlers that run a while
(every event says when its execution began), and a frozen heap for the cycle collector."""

from __future__ import annotations

import time

import pytest
import trio

import natrio
from natrio.testing import WorkerFactory

from .helpers import event_counts


async def test_a_long_handler_is_announced_once_and_a_quick_one_not_at_all(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(started_event_after=0.2)
    release = trio.Event()

    @worker.handle("job")
    async def job(ctx: natrio.TaskContext) -> bytes:
        if ctx.input == b"slow":
            await release.wait()
        return ctx.input

    await natrio_worker_factory.start(worker)
    before = time.time()
    assert await (await natrio_client.submit("job", b"quick", run_id="q", step_id="s")).result()
    async with await natrio_client.nc.subscribe("natrio.event.job.slow.s.started") as started:
        handle = await natrio_client.submit("job", b"slow", run_id="slow", step_id="s")
        announced = await started.receive()
        release.set()
        assert await handle.result() == b"slow"
    assert await event_counts(natrio_client.nc, "started") == {"natrio.event.job.slow.s.started": 1}
    completed = await natrio_client.js.last_message(
        "NATRIO_EVENTS", "natrio.event.job.slow.s.completed"
    )
    assert completed is not None
    began = completed.header("Natrio-Started")
    assert began is not None
    assert announced.header("Natrio-Started") == began
    assert before <= float(began) <= time.time()
    quick = await natrio_client.js.last_message("NATRIO_EVENTS", "natrio.event.job.q.s.completed")
    assert quick is not None
    assert quick.header("Natrio-Started") is not None


async def test_zero_announces_every_execution_as_it_starts(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(started_event_after=0)

    @worker.handle("job")
    async def job(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    await natrio_worker_factory.start(worker)
    for n in range(3):
        await (await natrio_client.submit("job", b"x", run_id=f"r{n}", step_id="s")).result()
    assert await event_counts(natrio_client.nc, "started") == {
        f"natrio.event.job.r{n}.s.started": 1 for n in range(3)
    }


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True, "1"])
async def test_started_event_after_must_be_a_finite_number(
    natrio_worker_factory: WorkerFactory, value: object
) -> None:
    with pytest.raises(natrio.ConfigurationError, match="started_event_after"):
        natrio_worker_factory(started_event_after=value)


async def test_a_starting_worker_freezes_what_exists_unless_told_not_to(
    natrio_worker_factory: WorkerFactory,
) -> None:
    import gc

    for freeze in (False, True):
        gc.unfreeze()
        worker = natrio_worker_factory(freeze_gc=freeze)

        @worker.handle("job")
        async def job(ctx: natrio.TaskContext) -> None:
            return None

        await natrio_worker_factory.start(worker)
        assert (gc.get_freeze_count() > 0) is freeze
    gc.unfreeze()


async def test_no_started_event_follows_an_outcome_recorded_early(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(started_event_after=0.05)
    release = trio.Event()

    @worker.handle("job")
    async def job(ctx: natrio.TaskContext) -> None:
        await ctx.complete(b"done")
        await release.wait()  # keeps running after its outcome

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("job", b"", run_id="early", step_id="s")
    assert await handle.result() == b"done"
    # Nothing to wait for when nothing should happen: give the announcer (a look every
    # 0.05 s) several chances to publish what it must not.
    await trio.sleep(0.3)
    release.set()
    assert await event_counts(natrio_client.nc, "started") == {}
