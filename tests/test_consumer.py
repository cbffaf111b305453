"""The continuous pull survives server restarts and deleted consumers."""

from __future__ import annotations

import trio

import natrio
from natrio.testing import WorkerFactory


async def test_worker_and_client_carry_on_after_server_restart(
    natrio_server: natrio.EmbeddedServer,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("echo")
    async def echo(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("echo", b"before")).result() == b"before"
    await trio.to_thread.run_sync(natrio_server.kill)
    await trio.to_thread.run_sync(natrio_server.start)
    with trio.fail_after(20):
        while True:
            try:
                handle = await natrio_client.submit("echo", b"after")
                break
            except natrio.NatrioError:
                await trio.sleep(0.1)  # reconnecting: nats-py retries every 0.5 s
        assert await handle.result() == b"after"


async def test_deleted_consumer_is_recreated(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("echo")
    async def echo(ctx: natrio.TaskContext) -> bytes:
        return ctx.input

    await natrio_worker_factory.start(worker)
    await natrio_client.js.delete_consumer("NATRIO_TASKS", "echo~default")
    with trio.fail_after(10):
        assert await (await natrio_client.submit("echo", b"again")).result() == b"again"
