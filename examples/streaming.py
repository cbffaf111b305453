"""A step that streams its progress while it runs, read live by the client.

The handler publishes chunks with ``ctx.put_stream(...)``; the client reads them with
``async with client.stream(run_id, step_id) as chunks: async for data in chunks``. The
chunks are core NATS messages, so only those sent after the subscription began are
seen: the reader subscribes *before* the task is submitted (with an explicit run id;
the step id defaults to the task type). The iteration ends when the step does, and
``chunks.outcome`` says how (``completed`` or ``dead``).

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/streaming.py
"""

from __future__ import annotations

import secrets

import trio

import natrio

CHUNKS = 5


async def read_chunks(
    client: natrio.Client,
    run_id: str,
    step_id: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with client.stream(run_id, step_id) as chunks:
        task_status.started()  # subscribed: now the task may be submitted
        async for data in chunks:
            print(f"  chunk: {data.decode()}")
    print(f"stream ended: {chunks.outcome}")


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(nc)

        @worker.handle("summarize")
        async def summarize(ctx: natrio.TaskContext) -> bytes:
            for i in range(1, CHUNKS + 1):
                await ctx.put_stream(f"part {i}/{CHUNKS} of {ctx.input.decode()}".encode())
                await trio.sleep(0.1)
            return b"summary done"

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)
            run_id = secrets.token_hex(8)
            with trio.fail_after(10):
                async with trio.open_nursery() as readers:
                    await readers.start(read_chunks, client, run_id, "summarize")
                    handle = await client.submit("summarize", b"the report", run_id=run_id)
                    print("result:", (await handle.result()).decode())
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
