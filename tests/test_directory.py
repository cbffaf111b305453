"""The worker directory: entries appear at start, refresh, and vanish on stop or by TTL."""

from __future__ import annotations

import signal
from datetime import datetime

import trio

import natrio
from natrio.testing import WorkerFactory

from .test_shutdown import read_line, worker_process


async def test_entry_appears_refreshes_and_goes_on_stop(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    worker = natrio.Worker(natrio_connection, groups=["gpu", "cpu"])

    @worker.handle("b-type")
    async def b(ctx: natrio.TaskContext) -> bytes:
        return b""

    @worker.handle("a-type")
    async def a(ctx: natrio.TaskContext) -> bytes:
        return b""

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        (entry,) = await natrio.list_workers(natrio_connection)
        assert entry.worker_id == worker.worker_id
        assert entry.worker_name == "a-type+b-type/cpu+gpu"
        assert entry.worker_id.startswith(entry.worker_name + ".")
        assert entry.task_types == ("a-type", "b-type")
        assert entry.groups == ("gpu", "cpu")
        assert entry.pid > 0
        assert entry.hostname
        assert entry.version == natrio.__version__
        updates = await natrio_connection.subscribe("$KV.natrio_workers.>")
        await (await natrio_client.submit("a-type", group="gpu")).result()
        # The bucket's TTL is 2 s, so the heartbeat rewrites the entry every 2/3 s.
        with trio.fail_after(3):
            refreshed = natrio.WorkerInfo.from_json((await updates.receive()).data)
        assert datetime.fromisoformat(refreshed.last_seen) > datetime.fromisoformat(entry.last_seen)
        assert refreshed.processed == 1
        worker.stop(grace=0)
    assert await natrio.list_workers(natrio_connection) == []


async def test_dead_worker_vanishes_by_ttl(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    buffer = bytearray()
    async with worker_process(natrio_server.url, ack_wait=30.0, grace=0.0) as process:
        worker_id = (await read_line(process, "READY", buffer)).split()[1]
        assert [w.worker_id for w in await natrio.list_workers(natrio_connection)] == [worker_id]
        process.send_signal(signal.SIGKILL)
        await process.wait()
    killed_at = trio.current_time()
    with trio.fail_after(5):
        # Expiry by max_age publishes nothing, so looking again is the only way to see it.
        while await natrio.list_workers(natrio_connection):  # noqa: ASYNC110
            await trio.sleep(0.1)
    # Gone by the 2 s TTL, not by a deregistration (the process could not send one).
    assert trio.current_time() - killed_at <= 2.0 + 1.0


async def test_worker_identity_is_stable_by_name(natrio_worker_factory: WorkerFactory) -> None:
    one, two = natrio_worker_factory(), natrio_worker_factory()
    for worker in (one, two):
        worker.handle("x", _noop)
    assert one.worker_name == two.worker_name == "x/default"
    assert one.worker_id != two.worker_id
    named = natrio_worker_factory(name="billing")
    assert named.worker_name == "billing"


async def _noop(ctx: natrio.TaskContext) -> bytes:
    return b""


async def test_forged_headers_on_an_entry_do_not_hide_the_others(
    natrio_connection: natrio.Connection, natrio_worker_factory: WorkerFactory
) -> None:
    # Anyone who may write the directory may add headers to their entry: a Status of
    # "end of batch" or a Nats-Subject of their own must not cut the batched read short.
    from natrio._jetstream import JetStream

    js = JetStream(natrio_connection)
    await js.publish(
        "$KV.natrio_workers.aaaa",
        b"not an entry",
        headers={"Status": "204", "Description": "EOB", "Nats-Subject": "$KV.natrio_workers.x"},
    )
    worker = natrio_worker_factory(name="listed")

    @worker.handle("a-type")
    async def noop(ctx: natrio.TaskContext) -> None:
        return None

    await natrio_worker_factory.start(worker)
    found = await natrio.list_workers(natrio_connection)
    assert [w.worker_name for w in found] == ["listed"]
