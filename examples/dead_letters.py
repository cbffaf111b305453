"""Repairing a failure without code changes: a task that keeps failing ends as a dead
letter; its history says why; it is replayed with a corrected input and completes.

The same steps from a shell: ``natrio events RUN``, ``natrio dlq list``,
``natrio dlq replay SEQ`` and ``natrio stats``.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/dead_letters.py
"""

from __future__ import annotations

import json

import trio

import natrio


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(
            nc, retry=natrio.RetryPolicy(maximum_attempts=2, initial_interval=0.05)
        )

        @worker.handle("invoice")
        async def invoice(ctx: natrio.TaskContext) -> bytes:
            order = json.loads(ctx.input)
            if order["amount"] < 0:
                raise ValueError(f"negative amount {order['amount']}")
            return f"invoiced {order['amount']}".encode()

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)
            handle = await client.submit("invoice", {"amount": -5}, run_id="order-17")
            try:
                with trio.fail_after(10):
                    await handle.result()
            except natrio.TaskFailed as failed:
                print(f"run {handle.run_id} failed for good: {failed}")

            history = await client.history(handle.run_id)
            for event in history.events:
                reason = f" ({event.error.message})" if event.error else ""
                print(f"  {event.kind:<9} attempt {event.attempt}{reason}")

            async for entry in client.dead_letters("invoice"):
                print(f"dead letter {entry.seq}: {entry.error.message}; replaying it fixed")
                replayed = await client.replay(entry, input={"amount": 5})
                with trio.fail_after(10):
                    print("replayed:", (await replayed.result()).decode())
                break

            overview = await client.overview()
            for queue in overview.queues:
                print(
                    f"{queue.task_type}/{queue.group}: {queue.pending} pending, "
                    f"{queue.dead_letters} dead letters"
                )
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
