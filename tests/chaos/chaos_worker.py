"""A worker process for the chaos suite.

Usage: python -m tests.chaos.chaos_worker URL [options]

``URL`` may be a comma-separated list (the nodes of a cluster); the connection fails over
between them.

Task types:
- ``work``: sleeps a random 0..``--max-ms`` milliseconds, returns its input; an input
  starting with ``poison`` always raises.
- ``slow``: prints ``STARTED <run_id>`` and sleeps ``--slow-s`` seconds.
Prints ``READY <worker_id>`` once serving; stops gracefully on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import random

import trio

import natrio


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ack-wait", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--max-ms", type=float, default=20.0)
    parser.add_argument("--slow-s", type=float, default=10.0)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--initial-interval", type=float, default=0.1)
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    async with natrio.connect(args.url.split(",")) as nc:
        worker = natrio.Worker(
            nc,
            concurrency=args.concurrency,
            ack_wait=args.ack_wait,
            shutdown_grace=args.grace,
            retry=natrio.RetryPolicy(
                initial_interval=args.initial_interval,
                backoff_coefficient=1.0,
                maximum_attempts=args.max_attempts,
            ),
            # Every execution announced: the scenarios' ledgers count starts per run.
            started_event_after=0,
        )

        @worker.handle("work")
        async def work(ctx: natrio.TaskContext) -> bytes:
            if ctx.input.startswith(b"poison"):
                raise RuntimeError("poison task")
            await trio.sleep(random.uniform(0, args.max_ms) / 1000)
            return ctx.input

        @worker.handle("slow")
        async def slow(ctx: natrio.TaskContext) -> bytes:
            print(f"STARTED {ctx.run_id}", flush=True)
            await trio.sleep(args.slow_s)
            return b"slow"

        async with trio.open_nursery() as nursery:
            await nursery.start(natrio.run_worker, worker)
            print(f"READY {worker.worker_id}", flush=True)


if __name__ == "__main__":
    trio.run(main, parse())
