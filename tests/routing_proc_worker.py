"""A worker in its own process, for the routing tests that move claims, kill and restart.

Usage: python -m tests.routing_proc_worker URL NAME [options]

- ``NAME``: the worker name (so it holds ``natrio.worker_target(NAME)``).
- ``--claims a,b``: static claims.
- ``--claims-file PATH``: claims read from PATH (comma- or line-separated) every time
  natrio calls the claims function (every 2 s); rewrite the file to move a claim.
- ``--task-ms``: how long each ``job`` sleeps; ``--concurrency``, ``--prefetch``,
  ``--ack-wait``, ``--grace``: as for :class:`natrio.Worker`.

Task type ``job`` (the only one) prints ``RAN <run_id> <held> <unix time>`` as it starts,
``held`` 1 when the worker holds the task's target then, and returns
``{"worker": NAME, "held": ..., "time": ..., "attempt": ..., "delivered": ...}`` as JSON
(``delivered``: the server's delivery count, which a hand-back at shutdown raises and
``attempt`` does not). Lines printed:

- ``CLAIMS <unix time> <claims>``: the claims function read a different list from the
  file (``-`` for none), printed before natrio takes it up;
- ``WAITING <json>``: what ``worker.statistics().waiting_for_claims`` says, when it changes;
- ``READY <worker_id>`` once serving;
- ``STOPPED <processed>`` after a graceful stop (SIGTERM, SIGINT).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import trio

import natrio


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("--claims", default="")
    parser.add_argument("--claims-file", type=Path)
    parser.add_argument("--task-ms", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prefetch", type=int)
    parser.add_argument("--ack-wait", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=5.0)
    return parser.parse_args()


def split(text: str) -> list[str]:
    return sorted({part.strip() for part in text.replace("\n", ",").split(",") if part.strip()})


class ClaimsFile:
    """The claims function: the names in a file, announced whenever they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: list[str] | None = None

    def __call__(self) -> list[str]:
        try:
            claims = split(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            claims = []
        if claims != self.last:
            self.last = claims
            print(f"CLAIMS {time.time()!r} {','.join(claims) or '-'}", flush=True)
        return claims


async def report_waiting(worker: natrio.Worker) -> None:
    # Another process cannot ask the worker; it reads these lines instead. The sweep that
    # fills waiting_for_claims runs on its own schedule, so look often.
    last: dict[str, int] = {}
    while True:
        waiting = worker.statistics().waiting_for_claims
        if waiting != last:
            last = waiting
            print(f"WAITING {json.dumps(waiting, sort_keys=True)}", flush=True)
        await trio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    claims = ClaimsFile(args.claims_file) if args.claims_file else split(args.claims)
    async with natrio.connect(args.url) as nc:
        worker = natrio.Worker(
            nc,
            name=args.name,
            claims=claims,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            ack_wait=args.ack_wait,
            shutdown_grace=args.grace,
            started_event_after=None,
        )

        @worker.handle("job")
        async def job(ctx: natrio.TaskContext) -> bytes:
            now = time.time()
            held = ctx.task.target is not None and ctx.task.target in worker.claims
            print(f"RAN {ctx.run_id} {int(held)} {now!r}", flush=True)
            await trio.sleep(args.task_ms / 1000)
            output = {
                "worker": args.name,
                "held": held,
                "time": now,
                "attempt": ctx.attempt,
                "delivered": ctx.task.delivered,
            }
            return json.dumps(output).encode()

        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                await natrio.run_worker(worker, task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped by a signal: stop reporting too

            await nursery.start(serve)
            print(f"READY {worker.worker_id}", flush=True)
            nursery.start_soon(report_waiting, worker)
        print(f"STOPPED {worker.statistics().dispatcher.processed}", flush=True)


if __name__ == "__main__":
    trio.run(main, parse())
