"""The worker directory: each running worker's entry in the ``natrio_workers`` KV bucket."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from . import _wire as wire
from ._errors import JetStreamError, NatrioError
from ._jetstream import STREAM_NOT_FOUND, JetStream, KeyValue
from ._model import WorkerInfo
from ._transport import Connection

log = logging.getLogger("natrio.directory")

_NS = 1_000_000_000


def _bucket(nc: Connection) -> KeyValue:
    return KeyValue(JetStream(nc), wire.WORKERS_BUCKET)


async def list_workers(nc: Connection, *, bucket: KeyValue | None = None) -> list[WorkerInfo]:
    """Every worker currently registered, sorted by worker id.

    A worker that died without deregistering disappears once its entry's TTL (the
    ``worker_ttl`` given to :func:`provision`) passes without a heartbeat. ``bucket``:
    the directory's bucket to read through (one kept by a caller that reads often).
    """
    workers = []
    for key, raw in (await (bucket or _bucket(nc)).items()).items():
        try:
            workers.append(WorkerInfo.from_json(raw))
        except Exception:  # any shape a client in any language may have written
            log.warning("ignoring unreadable directory entry %s", key)
    return sorted(workers, key=lambda w: w.worker_id)


class Registration:
    """One worker's entry: written at start, refreshed on a heartbeat (and whenever what it
    holds changes), deleted at stop."""

    def __init__(self, nc: Connection, key: str, describe: Callable[[], WorkerInfo]) -> None:
        self.kv = _bucket(nc)
        self.key = key
        self.describe = describe
        self.interval = 5.0
        self.ttl = 0.0
        self.registered = False
        self._soon = trio.Event()

    async def prepare(self) -> float:
        """Check that the bucket exists; its TTL (0: none). The heartbeat interval becomes
        a third of it."""
        try:
            info: dict[str, Any] = await self.kv.js.stream_info(self.kv.stream)
        except JetStreamError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                raise NatrioError(
                    f"the {wire.WORKERS_BUCKET} bucket does not exist: run natrio.provision() first"
                ) from None
            raise
        self.ttl = info["config"].get("max_age", 0) / _NS
        if self.ttl > 0:
            self.interval = self.ttl / 3
        return self.ttl

    async def register(self) -> None:
        """Write the entry."""
        await self.kv.put(self.key, self.describe().to_json())
        self.registered = True

    async def refresh(self) -> None:
        """Write the entry as it is now."""
        await self.kv.put(self.key, self.describe().to_json())

    def refresh_soon(self) -> None:
        """Have the heartbeat write the entry now rather than at its next beat."""
        self._soon.set()

    async def heartbeat(self) -> None:
        """Refresh the entry every interval until cancelled; a failed refresh is retried next time."""
        while True:
            with trio.move_on_after(self.interval):
                await self._soon.wait()
            self._soon = trio.Event()
            try:
                await self.refresh()
            except NatrioError as exc:
                log.warning("directory heartbeat failed: %r", exc)

    async def deregister(self) -> None:
        """Delete the entry."""
        self.registered = False
        await self.kv.delete(self.key)
