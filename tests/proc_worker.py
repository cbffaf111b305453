"""A worker in its own process, for tests that kill or signal it.

Usage: python -m tests.proc_worker URL ACK_WAIT GRACE
Prints ``READY <worker_id>`` once serving and ``STARTED <run_id> <attempt>`` when a
``hold`` task starts; ``hold`` handlers sleep for an hour.
"""

from __future__ import annotations

import sys

import trio

import natrio


async def main(url: str, ack_wait: float, grace: float) -> None:
    async with natrio.connect(url) as nc:
        worker = natrio.Worker(nc, concurrency=100, ack_wait=ack_wait, shutdown_grace=grace)

        @worker.handle("hold")
        async def hold(ctx: natrio.TaskContext) -> bytes:
            print(f"STARTED {ctx.run_id} {ctx.attempt}", flush=True)
            await trio.sleep(3600)
            return b"held"

        async with trio.open_nursery() as nursery:
            await nursery.start(natrio.run_worker, worker)
            print(f"READY {worker.worker_id}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
