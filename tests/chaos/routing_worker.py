"""A worker process for the routing chaos scenarios (tests/chaos/test_routing.py).

Usage: python -m tests.chaos.routing_worker URL [options]

Task types:
- ``keyed``: partitioned (``--partitions``, default 8); the input is JSON
  ``{"key": ..., "seq": ...}``; sleeps ``--keyed-ms`` milliseconds.
- ``solo``: a singleton; the input is the decimal sequence number; sleeps ``--solo-ms``.

Both write a ledger line to stdout as a handler starts and as it returns::

    START <type> <key> <seq> <partition or -> <worker id> <time.time()>
    END <type> <key> <seq> <partition or -> <worker id> <time.time()>

(``solo`` tasks have the key ``solo``). Prints ``READY <worker_id>`` once serving (ledger
lines may come before it); stops gracefully on SIGTERM/SIGINT (``natrio.run_worker``).
"""

from __future__ import annotations

import argparse
import json
import time

import trio

import natrio


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ack-wait", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--keyed-ms", type=float, default=10.0)
    parser.add_argument("--solo-ms", type=float, default=200.0)
    return parser.parse_args()


def ledger(mark: str, ctx: natrio.TaskContext, key: str, seq: int, worker_id: str) -> None:
    """One ledger line, written through at once (a SIGKILL loses nothing printed)."""
    partition = ctx.task.partition
    where = "-" if partition is None else str(partition)
    print(f"{mark} {ctx.task_type} {key} {seq} {where} {worker_id} {time.time():.6f}", flush=True)


async def main(args: argparse.Namespace) -> None:
    async with natrio.connect(args.url) as nc:
        worker = natrio.Worker(
            nc,
            concurrency=args.concurrency,
            ack_wait=args.ack_wait,
            shutdown_grace=args.grace,
        )

        @worker.handle("keyed", partitions=args.partitions)
        async def keyed(ctx: natrio.TaskContext) -> bytes:
            task = json.loads(ctx.input)
            key, seq = str(task["key"]), int(task["seq"])
            ledger("START", ctx, key, seq, worker.worker_id)
            await trio.sleep(args.keyed_ms / 1000)
            ledger("END", ctx, key, seq, worker.worker_id)
            return b""

        @worker.handle("solo", singleton=True)
        async def solo(ctx: natrio.TaskContext) -> bytes:
            seq = int(ctx.input)
            ledger("START", ctx, "solo", seq, worker.worker_id)
            await trio.sleep(args.solo_ms / 1000)
            ledger("END", ctx, "solo", seq, worker.worker_id)
            return b""

        async with trio.open_nursery() as nursery:
            await nursery.start(natrio.run_worker, worker)
            print(f"READY {worker.worker_id}", flush=True)


if __name__ == "__main__":
    trio.run(main, parse())
