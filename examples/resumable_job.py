"""A long job that checkpoints its progress, crashes midway, and resumes where it left off.

The handler works through N items, saving ``Progress(done)`` with ``ctx.checkpoint``
after each one. On its first attempt it raises midway (a simulated crash); the retry
policy tries again 0.2 s later, and the second attempt reads the checkpoint with
``ctx.load_checkpoint(Progress)`` and carries on from there instead of starting over.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/resumable_job.py
"""

from __future__ import annotations

import attrs
import trio

import natrio

ITEMS = 10
CRASH_AT = 6  # the first attempt dies before processing this item


@attrs.frozen
class Job:
    items: int


@attrs.frozen
class Progress:
    done: int


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(nc)

        @worker.handle_typed("crunch", retry=natrio.RetryPolicy(initial_interval=0.2))
        async def crunch(ctx: natrio.TaskContext, job: Job) -> Progress:
            progress: Progress = await ctx.load_checkpoint(Progress) or Progress(done=0)
            print(f"attempt {ctx.attempt}: starting at item {progress.done}")
            processed: list[int] = []
            try:
                for item in range(progress.done, job.items):
                    if ctx.attempt == 1 and item == CRASH_AT:
                        raise RuntimeError(f"simulated crash at item {item}")
                    await trio.sleep(0.05)  # the real work
                    processed.append(item)
                    await ctx.checkpoint(Progress(done=item + 1))
            finally:
                print(f"attempt {ctx.attempt}: processed items {processed}")
            return Progress(done=job.items)

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)
            handle = await client.submit("crunch", Job(items=ITEMS))
            with trio.fail_after(10):
                result = await handle.result(Progress)
            print(f"finished: {result}")
            stats = worker.statistics().dispatcher
            print(f"attempts failed: {stats.failed}, retried: {stats.retried}")
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
