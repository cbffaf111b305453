"""A human-approval step: the handler waits for a signal that someone sends to its run.

The handler calls ``ctx.wait_for_signal("approval", timeout=30)`` and stays there,
kept alive by the worker, until ``client.send_signal(run_id, "approval", data)``
arrives. A signal sent before the wait began is seen too, so the order does not matter;
here the "human" (``main``) thinks it over for half a second first.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/approval.py
"""

from __future__ import annotations

import trio

import natrio


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        worker = natrio.Worker(nc)

        @worker.handle("deploy")
        async def deploy(ctx: natrio.TaskContext) -> bytes:
            target = ctx.input.decode()
            print(f"handler: {target} is ready; waiting for approval")
            try:
                verdict = await ctx.wait_for_signal("approval", timeout=30)
            except natrio.SignalTimeout:
                return f"{target}: nobody approved in time, not deployed".encode()
            print(f"handler: got {verdict.decode()!r}")
            return f"{target}: deployed ({verdict.decode()})".encode()

        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            client = natrio.Client(nc)
            handle = await client.submit("deploy", b"release-1.2")
            print(f"submitted run {handle.run_id}")

            await trio.sleep(0.5)  # the human looks it over
            print("human: approving")
            await client.send_signal(handle.run_id, "approval", b"approved by alice")

            with trio.fail_after(10):
                print("result:", (await handle.result()).decode())
            worker.stop()


if __name__ == "__main__":
    trio.run(main)
