"""Membership: the live workers, as the directory lists them, looked at a few times a second
(one batched read of every entry each time)."""

from __future__ import annotations

import logging

import trio

from .. import _wire as wire
from .._directory import list_workers
from .._jetstream import JetStream, KeyValue
from .._model import WorkerInfo
from .._transport import Connection

log = logging.getLogger("natrio.routing")


class Membership:
    """The directory's entries, read every ``interval`` seconds; :meth:`changed` wakes on a
    difference.

    The server expires the entry of a worker that stopped heartbeating (the bucket's TTL),
    a worker that stops cleanly first marks itself ``stopping`` and then deletes its
    entry, and every worker reads the same bucket: all of them see the same members,
    give or take one interval.
    """

    def __init__(self, conn: Connection, *, interval: float = 0.5) -> None:
        self.conn = conn
        self.interval = interval
        self._bucket = KeyValue(JetStream(conn), wire.WORKERS_BUCKET)
        self.workers: tuple[WorkerInfo, ...] = ()
        self.version = 0
        self._changed = trio.Event()
        self._poke = trio.Event()

    def serving(self, task_type: str, group: str) -> list[WorkerInfo]:
        """The live workers (not stopping) serving ``task_type`` in ``group``."""
        return [
            w
            for w in self.workers
            if not w.stopping and task_type in w.task_types and group in w.groups
        ]

    async def refresh(self) -> None:
        """Read the directory now."""
        workers = tuple(await list_workers(self.conn, bucket=self._bucket))
        if _shape(workers) != _shape(self.workers):
            self.workers = workers
            self.version += 1
            self._changed.set()
            self._changed = trio.Event()
        else:
            self.workers = workers

    def poke(self) -> None:
        """Read the directory again at once (this worker's own entry changed)."""
        self._poke.set()

    async def changed(self, version: int) -> int:
        """Wait until the members differ from ``version``; the new version."""
        while self.version == version:
            await self._changed.wait()
        return self.version

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the directory every interval until cancelled; started after the first read."""
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("reading the worker directory failed: %r", exc)
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self._poke.wait()
            self._poke = trio.Event()
            try:
                await self.refresh()
            except Exception as exc:  # a bad entry or a failed read: the last view stays
                log.warning("reading the worker directory failed: %r; trying again", exc)


def _shape(workers: tuple[WorkerInfo, ...]) -> tuple[object, ...]:
    # What placement depends on; heartbeats change last_seen and counters, not this.
    return tuple((w.worker_id, w.task_types, w.groups, w.claims, w.stopping) for w in workers)
