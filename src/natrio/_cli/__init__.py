"""The ``natrio`` command line: a development server, a worker runner, task submission,
signals and streamed output, the worker directory, run histories and live
statistics, dead letters, and the benchmark.

Built only on natrio's public API, so it is also an example of using it from Trio: each
command that talks to NATS runs its async body with :func:`trio.run`. Errors natrio raises
become a one-line message on stderr and exit status 1 (2 for configuration and usage
errors) instead of a traceback. One module per command family; importing them registers
their commands on :data:`cli`.
"""

from __future__ import annotations

from . import _benchmark, _dlq, _observe, _server, _tasks, _worker, _workers
from ._app import cli, main
from ._worker import WorkerFactory, load_worker_factory, make_worker

__all__ = ["WorkerFactory", "cli", "load_worker_factory", "main", "make_worker"]

del _benchmark, _dlq, _observe, _server, _tasks, _worker, _workers
