"""Worker factories for ``natrio worker --processes N`` in tests/test_supervisor.py.

Task types are prefixed ``sup-`` so they do not meet other tests' workers.
"""

from __future__ import annotations

import os
import sys

import trio

import natrio


def make_worker(nc: natrio.Connection) -> natrio.Worker:
    """Two task types: ``sup-work`` takes a little while, ``sup-slow`` a second.

    A short ``ack_wait`` so that the tasks a SIGKILLed process held come back quickly.
    """
    worker = natrio.Worker(nc, concurrency=4, ack_wait=2.0, shutdown_grace=10)

    @worker.handle("sup-work")
    async def work(ctx: natrio.TaskContext) -> bytes:
        # Long enough that one process cannot take every task before the other pulls.
        await trio.sleep(0.02)
        return os.environ.get("NATRIO_WORKER_INDEX", "-").encode()

    @worker.handle("sup-slow")
    async def slow(ctx: natrio.TaskContext) -> bytes:
        # The test waits for this line before it signals the supervisor, so the task is
        # running when the shutdown begins.
        print(f"SLOW STARTED {ctx.run_id}", file=sys.stderr, flush=True)
        await trio.sleep(1.0)
        return b"slow done"

    return worker


def make_broken_worker(nc: natrio.Connection) -> natrio.Worker:
    """A factory that fails every time: the supervisor must give up, not restart forever."""
    raise RuntimeError("this factory fails on purpose")
