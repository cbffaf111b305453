"""A pull the consumer forgot on reconnect must not shrink what its new pulls asked for.

Regression test for item 11: all pulls shared one reply subject, so when a quick reconnect
left the old pull alive on the server, that pull's 408 at expiry was charged to the new
pull and the consumer sent a second window's worth of pulls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import natrio
from natrio._consumer import PullConsumer
from natrio._jetstream import JetStream

STREAM = "PULLTEST"
CONSUMER = "reconnect"
WINDOW = 4


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for data in source:
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class _Proxy:
    """A TCP proxy to the server whose connections :meth:`cut` breaks (the server stays up)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self._connections: set[trio.CancelScope] = set()

    def cut(self) -> None:
        for scope in list(self._connections):
            scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target) as upstream:
            with trio.CancelScope() as scope:
                self._connections.add(scope)
                try:
                    async with trio.open_nursery() as nursery:

                        async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                            await _pump(a, b)
                            nursery.cancel_scope.cancel()  # one side closed: close both

                        nursery.start_soon(pump, client, upstream)
                        nursery.start_soon(pump, upstream, client)
                finally:
                    self._connections.discard(scope)


@asynccontextmanager
async def _proxy(port: int) -> AsyncIterator[_Proxy]:
    proxy = _Proxy(port)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        proxy.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        try:
            yield proxy
        finally:
            proxy.cut()
            nursery.cancel_scope.cancel()


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    # Polled (ASYNC110): the consumer's state on the server is only observable by asking.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


@pytest.mark.slow
async def test_late_status_of_a_forgotten_pull_is_not_charged_to_the_new_pull(
    natrio_server: natrio.EmbeddedServer, nursery: trio.Nursery
) -> None:
    async with (
        _proxy(natrio_server.port) as proxy,
        natrio.connect(f"nats://127.0.0.1:{proxy.port}", reconnect_time_wait=0.05) as nc,
    ):
        js = JetStream(nc)
        await js.ensure_stream({"name": STREAM, "subjects": ["pulltest.>"], "storage": "memory"})
        await js.ensure_consumer(
            STREAM, {"durable_name": CONSUMER, "ack_policy": "explicit", "ack_wait": 60 * 10**9}
        )

        async def info() -> dict[str, Any]:
            return await js.consumer_info(STREAM, CONSUMER)

        async def until_waiting(count: int) -> None:
            async def waiting() -> bool:
                pulls_waiting: int = (await info())["num_waiting"]
                return pulls_waiting == count

            await _until(waiting)

        async def reconnected() -> bool:
            # The reconnect listener reset the consumer, which pulled afresh.
            return consumer.pulls >= 2

        async def settled() -> bool:
            # Nothing waiting any more, and all that was delivered has arrived.
            state.update(await info())
            return not state["num_waiting"] and len(held) >= state["num_ack_pending"]

        held: list[natrio.Message] = []
        state: dict[str, Any] = {}
        # Heartbeats every second, pulls expire after 3: the reconnect falls between two
        # heartbeats, so the server still holds the old pull when the client is back.
        consumer = PullConsumer(
            nc,
            stream=STREAM,
            name=CONSUMER,
            window=WINDOW,
            sink=held.append,
            expires=3.0,
            heartbeat=1.0,
        )
        await nursery.start(consumer.run)
        assert consumer._inbox is not None
        # A second subscription on the consumer's inbox sees its status replies too.
        spy = await nc.subscribe(consumer._inbox.subject)

        async def next_status(status: str) -> None:
            while (await spy.receive()).status != status:
                pass

        with trio.fail_after(15):
            await until_waiting(1)
            await next_status("100")  # just after a heartbeat: the next is a second away
            proxy.cut()
            await _until(reconnected)
            await until_waiting(2)  # the old pull survived the reconnect, as in the bug
            assert consumer.requested == WINDOW

            await next_status("408")  # the old pull expired, 4 unfilled
            await nc.flush()  # ... and the consumer has seen that too
            assert consumer.requested == WINDOW
            # The fix: the old pull's 408 changes nothing. The bug: it cancelled the new
            # pull's count, and a further pull went out, 2 x WINDOW waiting on the server.
            assert (await info())["num_waiting"] == 1

            for n in range(3 * WINDOW):
                await js.publish(f"pulltest.{n}", b"task")
            await _until(settled)
        assert state["num_ack_pending"] == len(held) == consumer.held == WINDOW
        assert state["num_pending"] == 2 * WINDOW
        assert consumer.requested == 0
        await consumer.stop()
