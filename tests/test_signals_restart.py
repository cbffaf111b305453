"""A step waiting for a signal gets it even when the server restarts or its watch is lost."""

from __future__ import annotations

import pytest
import trio

import natrio
from natrio import _wire as wire
from natrio._jetstream import JetStream, KeyValue
from natrio.testing import WorkerFactory

SIGNALS_STREAM = f"KV_{wire.SIGNALS_BUCKET}"


async def watch_consumers(js: JetStream) -> list[str]:
    """The consumers on the signals bucket: the watches of waiting steps."""
    reply = await js.api(f"CONSUMER.NAMES.{SIGNALS_STREAM}")
    return list(reply.get("consumers") or [])


async def wait_for_watch(js: JetStream) -> list[str]:
    """Poll until a signal watch exists (the step is waiting), and return its consumers."""
    with trio.fail_after(10):
        while True:
            names = await watch_consumers(js)
            if names:
                return names
            await trio.sleep(0.05)


async def test_signal_sent_after_a_server_restart_reaches_the_waiting_step(
    natrio_server: natrio.EmbeddedServer,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    worker = natrio_worker_factory()
    waiting = trio.Event()
    attempts: list[int] = []

    @worker.handle("approve")
    async def approve(ctx: natrio.TaskContext) -> bytes:
        attempts.append(ctx.attempt)
        waiting.set()
        return await ctx.wait_for_signal("go", timeout=30)

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("approve", run_id="restarted")
    with trio.fail_after(10):
        await waiting.wait()
    await wait_for_watch(natrio_client.js)
    # The watch's in-memory consumer dies with the server; the connection reconnects.
    await trio.to_thread.run_sync(natrio_server.kill)
    await trio.to_thread.run_sync(natrio_server.start)
    # Well inside the wait's 30 s: without a recreated watch the step would only see the
    # signal on its next attempt, after SignalTimeout.
    with trio.fail_after(15):
        while True:
            try:
                await natrio_client.send_signal("restarted", "go", b"after the restart")
                break
            except natrio.NatrioError:
                await trio.sleep(0.1)  # reconnecting: nats-py retries every 0.5 s
        assert await handle.result() == b"after the restart"
    assert attempts == [1]


async def test_signal_sent_before_the_wait_returns_at_once(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    waited: list[float] = []

    @worker.handle("approve")
    async def approve(ctx: natrio.TaskContext) -> bytes:
        start = trio.current_time()
        data = await ctx.wait_for_signal("go", timeout=30)
        waited.append(trio.current_time() - start)
        return data

    await natrio_worker_factory.start(worker)
    await natrio_client.send_signal("early", "go", b"already there")
    with trio.fail_after(5):
        assert await (await natrio_client.submit("approve", run_id="early")).result() == (
            b"already there"
        )
    assert len(waited) == 1
    assert waited[0] < 1.0


async def test_lost_watch_consumer_is_recreated_after_missed_heartbeats(
    natrio_connection: natrio.Connection,
) -> None:
    js = JetStream(natrio_connection)
    kv = KeyValue(js, wire.SIGNALS_BUCKET)
    await kv.put("run.lost", b"first")
    async with kv.watch("run.lost", heartbeat=0.5) as entries:
        with trio.fail_after(5):
            assert (await entries.receive()).data == b"first"
        # Deleted behind the watch's back: no reconnect, only the silence tells.
        [lost] = await watch_consumers(js)
        await js.delete_consumer(SIGNALS_STREAM, lost)
        with trio.move_on_after(4):
            # Three heartbeats of silence, then a new consumer reads "first" again,
            # which is not handed on a second time.
            entry = await entries.receive()
            pytest.fail(f"an entry came twice: {entry.data!r}")
        assert entries.recreated >= 1
        [recreated] = await watch_consumers(js)
        assert recreated != lost
        await kv.put("run.lost", b"second")
        with trio.fail_after(5):
            assert (await entries.receive()).data == b"second"
    # The watch's consumer goes with it.
    assert await watch_consumers(js) == []
