"""The consumers a worker starts and stops while it runs, as the partitions and claims it
holds change."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from .. import _wire as wire
from .._consumer import PullConsumer
from .._jetstream import JetStream

if TYPE_CHECKING:
    from .._dispatch import Dispatcher, Route
    from .._transport import Connection

log = logging.getLogger("natrio.routing")


class ConsumerSet:
    """Pull consumers that come and go, each pulled in this set's nursery.

    :meth:`add` creates (or updates) the durable consumer and starts pulling it;
    :meth:`remove` stops pulling and drains its inbox in the background, while what it
    already delivered runs to its end in the dispatcher like any other task.
    """

    def __init__(self, conn: Connection, dispatcher: Dispatcher, *, window: int) -> None:
        self.conn = conn
        self.js = JetStream(conn)
        self.dispatcher = dispatcher
        self.window = window
        self._live: dict[str, PullConsumer] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False

    def __contains__(self, name: str) -> bool:
        return name in self._live

    @property
    def names(self) -> frozenset[str]:
        """The consumers pulled now."""
        return frozenset(self._live)

    def live(self) -> list[PullConsumer]:
        """The consumers pulled now."""
        return list(self._live.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the consumers are pulled in, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def add(
        self,
        route: Route,
        group: str,
        placement: str | None,
        *,
        max_ack_pending: int = -1,
        window: int | None = None,
        recreate: bool = True,
    ) -> PullConsumer | None:
        """Create the consumer of ``route`` in ``group`` (and ``placement``) and pull it;
        None when it is pulled already or the set is closing. When the consumer is deleted
        while pulled, it is made again, or (``recreate`` false) no longer pulled."""
        name = wire.consumer_name(route.task_type, group, placement)
        if name in self._live or self._closed or self._nursery is None:
            return None
        config = wire.consumer_config(
            route.task_type,
            group,
            route.ack_wait,
            placement=placement,
            max_ack_pending=max_ack_pending,
        )

        async def make(config: dict[str, Any] = config) -> None:
            await self.js.ensure_consumer(wire.TASK_STREAM, config)

        async def forget() -> None:
            self.remove(name)

        await make()
        exclusive = max_ack_pending > 0
        if exclusive:
            # Its deliveries' leases start from a proof of the link (see Dispatcher.sink).
            await self.dispatcher.prove_link()
        if name in self._live or self._closed:
            return None
        consumer = PullConsumer(
            self.conn,
            stream=wire.TASK_STREAM,
            name=name,
            window=window or self.window,
            recreate=make if recreate else forget,
        )
        consumer.sink = self.dispatcher.sink(
            route, wire.group_token(group, placement), consumer, exclusive=exclusive
        )
        self._live[name] = consumer
        await self._nursery.start(consumer.run)
        return consumer

    def remove(self, name: str) -> None:
        """Stop pulling consumer ``name``; its inbox is drained in the background so that
        whatever the server already sent still arrives (the server forgets a waiting pull
        once its inbox has no subscriber)."""
        consumer = self._live.pop(name, None)
        if consumer is None:
            return
        consumer.stop_pulling()
        if self._nursery is not None:
            self._nursery.start_soon(consumer.stop)

    def close(self) -> list[PullConsumer]:
        """Take no more consumers; the live ones, for the worker's shutdown to stop."""
        self._closed = True
        live = list(self._live.values())
        return live
