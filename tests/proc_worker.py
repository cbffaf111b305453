"""A worker in its own process, for tests that kill or signal it.

Usage: python -m tests.proc_worker URL ACK_WAIT GRACE
Prints ``READY <worker_id>`` once serving and ``STARTED <run_id> <attempt>`` when a
``hold`` task starts; ``hold`` handlers sleep for an hour. ``resumable`` checkpoints its
progress through 6 items and stops for an hour after the third (``CHECKPOINTED 3``);
``loop`` is an agent loop that stops for an hour at iteration 10 (``ITERATION 10``).
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

        @worker.handle("resumable")
        async def resumable(ctx: natrio.TaskContext) -> bytes:
            saved = await ctx.load_checkpoint()
            start = int(saved) if saved else 0
            for item in range(start, 6):
                await ctx.checkpoint(str(item + 1).encode())
                if item == 2:
                    print("CHECKPOINTED 3", flush=True)
                    await trio.sleep(3600)
            return f"started at {start}".encode()

        @worker.handle("loop")
        async def loop(ctx: natrio.TaskContext) -> bytes:
            if ctx.iteration == 10:
                print("ITERATION 10", flush=True)
                await trio.sleep(3600)
            await ctx.continue_with(ctx.input + b".")
            return b""

        async with trio.open_nursery() as nursery:
            await nursery.start(natrio.run_worker, worker)
            print(f"READY {worker.worker_id}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
