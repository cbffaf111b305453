"""Delayed and recurring tasks: a task that runs a second from now, and a schedule that
submits one every second, each firing a run of its own (docs/schedules.md).

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one. Needs nats-server 2.12 or later (message schedules).

    python examples/schedules.py
"""

from __future__ import annotations

import math
import time

import trio

import natrio


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)  # the task stream holds message schedules from now on
        worker = natrio.Worker(nc)
        reports, received = trio.open_memory_channel[str](math.inf)

        @worker.handle("remind")
        async def remind(ctx: natrio.TaskContext) -> bytes:
            return b"reminded: " + ctx.input

        @worker.handle("report")
        async def report(ctx: natrio.TaskContext) -> bytes:
            reports.send_nowait(ctx.run_id)
            return b"reported"

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)

            began = time.monotonic()
            handle = await client.submit("remind", b"stand up", delay=1.0)
            print(await handle.result(), f"after {time.monotonic() - began:.1f} s")

            await client.schedule("report", b"", schedule_id="heartbeat", every=1)
            for schedule in await client.schedules():
                print("schedule", schedule.schedule_id, schedule.spec, "->", schedule.task_type)
            with trio.fail_after(10):
                for _ in range(2):
                    # Every firing has its own run id: <schedule id>=<its time in ns>.
                    print("fired as run", await received.receive())
                triggered = await client.trigger("heartbeat")  # once now; the schedule stays
                print("triggered run", triggered.run_id, await triggered.result())
            print("cancelled:", await client.cancel_schedule("heartbeat"))
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
