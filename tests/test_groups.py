"""Groups: every task lives in exactly one group; grouped and ungrouped workers coexist."""

from __future__ import annotations

import natrio
from natrio.testing import WorkerFactory


async def test_grouped_and_ungrouped_workers_side_by_side(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    plain = natrio_worker_factory()
    gpu = natrio_worker_factory(groups=["gpu"])
    both = natrio_worker_factory(groups=["default", "batch"])

    async def infer(ctx: natrio.TaskContext) -> bytes:
        return f"{ctx.group}:{ctx.worker_id}".encode()

    for worker in (plain, gpu, both):
        worker.handle("infer", infer)
        await natrio_worker_factory.start(worker)

    for group, allowed in ((None, {plain, both}), ("gpu", {gpu}), ("batch", {both})):
        for i in range(6):
            output = (
                await (
                    await natrio_client.submit("infer", run_id=f"{group}-{i}", group=group)
                ).result()
            ).decode()
            served_group, served_by = output.split(":", 1)
            assert served_group == (group or "default")
            assert served_by in {w.worker_id for w in allowed}


async def test_retry_keeps_the_group(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(groups=["gpu"], retry=natrio.RetryPolicy(initial_interval=0.05))
    groups: list[tuple[str, int]] = []

    @worker.handle("retry-me")
    async def retry_me(ctx: natrio.TaskContext) -> bytes:
        groups.append((ctx.group, ctx.attempt))
        if ctx.attempt < 3:
            raise RuntimeError("again")
        return b"ok"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("retry-me", group="gpu")).result() == b"ok"
    assert groups == [("gpu", 1), ("gpu", 2), ("gpu", 3)]
