"""A partitioned worker for the network-partition scenario (tests/chaos/test_fencing.py).

Usage: python -m tests.chaos.fenced_worker URL NAME — serves ``held`` (1 partition) and
``solo`` (a singleton), whose handlers wait for a minute. Prints ``READY <worker_id>`` once serving, and
``START <run_id> <time.time()>`` as a handler starts and ``FENCED <run_id> <time.time()>``
when one is cancelled.
"""

from __future__ import annotations

import sys
import time

import trio

import natrio


async def main(url: str, name: str) -> None:
    async with natrio.connect(url) as nc:
        worker = natrio.Worker(nc, name=name, ack_wait=10.0, shutdown_grace=0.0)

        @worker.handle("held", partitions=1)
        @worker.handle("solo", singleton=True)
        async def held(ctx: natrio.TaskContext) -> bytes:
            print(f"START {ctx.run_id} {time.time():.6f}", flush=True)
            try:
                await trio.sleep(60)
            except trio.Cancelled:
                print(f"FENCED {ctx.run_id} {time.time():.6f}", flush=True)
                raise
            return b"held for a minute"

        async with trio.open_nursery() as nursery:
            await nursery.start(natrio.run_worker, worker)
            print(f"READY {worker.worker_id}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
