"""Routing: per-key order across two workers, a singleton, a targeted and a colocated step,
and a rate limit (see docs/routing.md).

Two workers ("east" and "west") share the partitions of ``ledger``: each account's
entries run one at a time and in order, whichever worker holds the account's partition.
``compact`` is a singleton; ``render`` runs only on the worker holding the claim ``gpu``;
``finish`` is sent to the worker that ran ``prepare``; ``notify`` starts at most 5 times
per second.

Connects to $NATRIO_URL (or nats://127.0.0.1:4222); when no NATS server answers there,
it starts an embedded one.

    python examples/routing.py
"""

from __future__ import annotations

import time

import trio

import natrio


def make_worker(nc: natrio.Connection, name: str, *, gpu: bool) -> natrio.Worker:
    worker = natrio.Worker(nc, name=name, claims=["gpu"] if gpu else [])
    balances: dict[str, int] = {}

    @worker.handle("ledger", partitions=4)
    async def ledger(ctx: natrio.TaskContext) -> bytes:
        account, amount = ctx.input.decode().split(":")
        balances[account] = balances.get(account, 0) + int(amount)
        return f"{name} p{ctx.task.partition}".encode()

    @worker.handle("compact", singleton=True)
    async def compact(ctx: natrio.TaskContext) -> bytes:
        await trio.sleep(0.01)
        return name.encode()

    @worker.handle("render")
    async def render(ctx: natrio.TaskContext) -> bytes:
        return f"rendered on {name}".encode()

    @worker.handle("prepare")
    async def prepare(ctx: natrio.TaskContext) -> bytes:
        return name.encode()

    @worker.handle("finish")
    async def finish(ctx: natrio.TaskContext) -> bytes:
        return name.encode()

    @worker.handle("notify", rate_limit=natrio.RateLimit(5, 1.0, scope="cluster"))
    async def notify(ctx: natrio.TaskContext) -> bytes:
        return repr(time.time()).encode()

    return worker


async def main() -> None:
    async with natrio.connect_or_embed() as nc:
        await natrio.provision(nc)
        east = make_worker(nc, "east", gpu=True)
        west = make_worker(nc, "west", gpu=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(east.run)
            await nursery.start(west.run)
            client = natrio.Client(nc)
            with trio.fail_after(30):
                # The workers see each other in the directory within half a second and
                # split the partitions (nothing to await: it is another loop's doing).
                while len(east.statistics().partitions.get("ledger/default", ())) != 2:  # noqa: ASYNC110
                    await trio.sleep(0.1)
                for worker in (east, west):
                    print(worker.worker_name, "holds", worker.statistics().partitions)

                entries = [
                    await client.submit("ledger", f"{account}:{amount}".encode(), key=account)
                    for amount in range(1, 4)
                    for account in ("alice", "bob", "carol")
                ]
                for handle in entries:
                    print("ledger ->", (await handle.result()).decode())

                singles = [await client.submit("compact") for _ in range(4)]
                print("compact ran on", [(await h.result()).decode() for h in singles])

                render = await client.submit("render", target="gpu")
                print("render ->", (await render.result()).decode())

                first = await client.submit("prepare")
                ran_on = (await first.result()).decode()
                second = await client.submit("finish", colocate_with=first)
                print(f"prepare ran on {ran_on}, finish on {(await second.result()).decode()}")

                notes = [await client.submit("notify") for _ in range(10)]
                seconds = sorted([int(float(await h.result())) for h in notes])
                per_second = {second: seconds.count(second) for second in seconds}
                print("notify starts per second:", list(per_second.values()))
            east.stop()
            west.stop()


if __name__ == "__main__":
    trio.run(main)
