"""The natrio programs ``natrio bench`` runs, each in its own process like the baselines.

``python -m natrio._bench.contestants <name> --url URL [--count N] ...`` prints its
figures as one JSON line (see ``workload.emit``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

import natrio

from .workload import TASK_TYPE, Job, JobDone, emit, rss_bytes


async def drain(url: str, count: int, concurrency: int) -> dict[str, Any]:
    """Drain ``count`` queued tasks with a natrio worker running the typed no-op."""
    async with natrio.connect(url) as nc:
        worker = natrio.Worker(nc, concurrency=concurrency)

        @worker.handle_typed(TASK_TYPE)
        async def noop(ctx: natrio.TaskContext, job: Job) -> JobDone:
            return JobDone(job.n, True)

        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            await nursery.start(worker.run)
            # The worker has no "all acked" event; a 1 ms poll costs it next to nothing.
            while worker.statistics().dispatcher.processed < count:  # noqa: ASYNC110
                await trio.sleep(0.001)
            await nc.flush()
            elapsed = time.perf_counter() - started
            worker.stop()
    return {"tasks": count, "seconds": elapsed, "rate": count / elapsed, "concurrency": concurrency}


def main(argv: list[str] | None = None) -> None:
    """Run one natrio contestant and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m natrio._bench.contestants")
    parser.add_argument("name", choices=["drain"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args(argv)
    rss_start = rss_bytes()
    figures = trio.run(drain, args.url, args.count, args.concurrency)
    emit(figures | {"rss_start": rss_start, "rss_end": rss_bytes()})


if __name__ == "__main__":
    main()
