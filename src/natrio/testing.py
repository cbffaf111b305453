"""pytest plugin: a real nats-server, a provisioned connection and workers, as fixtures.

Installed with natrio as a ``pytest11`` entry point, so any project's tests get it.
The fixtures are async and need pytest-trio (``trio_mode = true``, or mark the tests
with ``@pytest.mark.trio``):

- ``natrio_server``: a fresh :class:`natrio.EmbeddedServer` for each test, stopped
  afterwards even when the test fails (it starts in tens of milliseconds).
- ``natrio_connection``: a connection to it with natrio's streams and buckets provisioned
  (``worker_ttl`` of 2 s so directory tests run quickly).
- ``natrio_client``: a :class:`natrio.Client` on that connection.
- ``natrio_worker_factory``: ``factory(**options)`` makes a :class:`natrio.Worker` on
  that connection; ``await factory.start(worker)`` runs it in the test's nursery until
  the test ends (then it is stopped with no grace).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio

from ._client import Client
from ._provision import provision
from ._server import EmbeddedServer
from ._transport import Connection, connect
from ._worker import Worker


class WorkerFactory:
    """Makes workers on the test's connection and runs them in the test's nursery."""

    def __init__(self, nc: Connection, nursery: trio.Nursery) -> None:
        self.nc = nc
        self.nursery = nursery
        self.started: list[Worker] = []

    def __call__(self, **options: Any) -> Worker:
        """A new, not yet started worker; ``options`` go to :class:`natrio.Worker`.

        ``freeze_gc`` is off unless given: a test process starts many workers, and each
        freeze would keep the heap built so far from the cycle collector meanwhile.
        """
        options.setdefault("freeze_gc", False)
        return Worker(self.nc, **options)

    async def start(self, worker: Worker) -> Worker:
        """Start ``worker`` and return once it is pulling and registered."""
        await self.nursery.start(worker.run)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        """Stop every started worker at once (grace 0)."""
        for worker in self.started:
            worker.stop(0.0)


@pytest.fixture
def natrio_server() -> Iterator[EmbeddedServer]:
    """A real nats-server with JetStream on a random loopback port, for one test."""
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def natrio_connection(natrio_server: EmbeddedServer) -> AsyncIterator[Connection]:
    """A connection to ``natrio_server`` with natrio's streams and buckets provisioned."""
    async with connect(natrio_server.url) as nc:
        await provision(nc, worker_ttl=2.0)
        yield nc


@pytest.fixture
async def natrio_client(natrio_connection: Connection) -> Client:
    """A client on ``natrio_connection``."""
    return Client(natrio_connection)


@pytest.fixture
async def natrio_worker_factory(
    natrio_connection: Connection, nursery: trio.Nursery
) -> AsyncIterator[WorkerFactory]:
    """Makes workers (``factory(**options)``) and starts them (``await factory.start(w)``)."""
    factory = WorkerFactory(natrio_connection, nursery)
    try:
        yield factory
    finally:
        factory.stop_all()
