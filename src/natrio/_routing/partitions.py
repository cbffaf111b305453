"""Partitions: a task type's partition count, stored once, and the coordinator that keeps
this worker pulling exactly the partitions the live members assign to it.

Hand-over: each partition is one durable consumer with ``max_ack_pending: 1``, so the
server delivers a partition's next task only once the previous one is settled, whoever
pulls it. A member that loses a partition stops pulling it and lets the task it holds
run to its end; the member that gains it pulls at once, and its pull is answered when
that task is acked (or, when its holder died, once the ack wait passes). Two members
never run tasks of one partition at once, and a key's tasks run in stream order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from .. import _wire as wire
from .._errors import ConfigurationError, JetStreamError, NatrioError, NoResponders
from .._jetstream import STREAM_NOT_FOUND, JetStream, KeyValue
from .consumers import ConsumerSet
from .members import Membership
from .placement import assign, check_partitions

if TYPE_CHECKING:
    from .._dispatch import Route
    from .._transport import Connection

log = logging.getLogger("natrio.routing")


def _bucket(conn: Connection) -> KeyValue:
    return KeyValue(JetStream(conn), wire.ROUTING_BUCKET)


async def stored_partitions(conn: Connection, task_type: str) -> int | None:
    """The partition count stored for ``task_type``, or None when it is not partitioned."""
    try:
        raw = await _bucket(conn).get(wire.partitions_key(task_type))
    except NoResponders:
        return None  # no routing bucket (provisioned by an older natrio): nothing stored
    if raw is None:
        return None
    try:
        return check_partitions(int(raw))
    except (ValueError, ConfigurationError):
        raise NatrioError(
            f"the stored partition count of {task_type!r} is not readable: {raw[:32]!r}"
        ) from None


async def store_partitions(conn: Connection, task_type: str, partitions: int) -> None:
    """Store ``task_type``'s partition count, or check that the stored one is the same.

    Raises ConfigurationError when another count is stored: changing it would move keys
    to other partitions while their tasks wait (stop every worker of the type and drain
    its tasks, then delete the key ``partitions.<type>`` of the ``natrio_routing`` bucket).
    """
    check_partitions(partitions)
    kv = _bucket(conn)
    key = wire.partitions_key(task_type)
    try:
        created = await kv.create(key, str(partitions).encode())
    except JetStreamError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise NatrioError(
                f"the {wire.ROUTING_BUCKET} bucket does not exist: run natrio.provision() first"
            ) from None
        raise
    if created:
        return
    stored = await stored_partitions(conn, task_type)
    if stored != partitions:
        raise ConfigurationError(
            f"task type {task_type!r} has {stored} partitions, not {partitions}: every "
            "worker and provision() must agree (see docs/routing.md to change it)"
        )


class PartitionCoordinator:
    """Keeps this worker pulling the partitions the live members assign to it.

    The members of a partitioned task type in a group are the live workers (not
    stopping) serving it there, as :class:`Membership` reads them; :func:`assign` gives
    each its share, the same on every member. On every change this worker adds the
    partitions it gained and removes those it lost.
    """

    def __init__(
        self,
        routes: Sequence[tuple[Route, str]],
        consumers: ConsumerSet,
        membership: Membership,
        *,
        worker_id: str,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.routes = list(routes)
        self.consumers = consumers
        self.membership = membership
        self.worker_id = worker_id
        self.on_change = on_change
        #: The partitions held now, by ``<task_type>/<group>``.
        self.held: dict[str, tuple[int, ...]] = {}
        self.rebalances = 0
        self.stopping = False

    async def apply(self) -> None:
        """Pull what the current members assign to this worker, and nothing else."""
        for route, group in self.routes:
            partitions = route.partitions
            assert partitions is not None
            members = {w.worker_id for w in self.membership.serving(route.task_type, group)}
            if self.stopping:
                members.discard(self.worker_id)
            else:
                members.add(self.worker_id)
            mine = assign(partitions, members).get(self.worker_id, ())
            label = f"{route.task_type}/{group}"
            before = self.held.get(label, ())
            names = {
                partition: wire.consumer_name(
                    route.task_type, group, wire.partition_placement(partition)
                )
                for partition in range(partitions)
            }
            try:
                # What is pulled, not what was meant to be: an earlier apply may have
                # failed half-way.
                for partition, name in names.items():
                    if partition not in mine and name in self.consumers:
                        self.consumers.remove(name)
                for partition in mine:
                    await self.consumers.add(
                        route,
                        group,
                        wire.partition_placement(partition),
                        max_ack_pending=1,
                        window=1,
                    )
            finally:
                held = tuple(p for p, name in names.items() if name in self.consumers)
                self.held[label] = held
                if held != before:
                    self.rebalances += 1
                    log.info("holding partitions %s of %s", _ranges(held), label)
                    self.on_change()  # the directory entry says which, for `natrio workers`

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply the assignment, then again after every change of members."""
        version = self.membership.version
        await self.apply()
        task_status.started()
        while True:
            version = await self.membership.changed(version)
            try:
                await self.apply()
            except NatrioError as exc:
                log.warning("taking partitions failed: %r; trying again", exc)
                await trio.sleep(0.5)
                version = -1


def _ranges(partitions: tuple[int, ...]) -> str:
    return ",".join(map(str, partitions)) or "none"
