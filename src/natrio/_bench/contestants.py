"""The natrio programs ``natrio bench`` runs, each in its own process like the baselines.

``python -m natrio._bench.contestants <name> --url URL [--count N] ...`` prints its
figures as one JSON line (see ``workload.emit``):

- ``drain``: a worker running the typed no-op drains ``--count`` queued tasks.
- ``roundtrip-worker``: the same worker, serving until SIGTERM, SIGINT or the end of its
  stdin; prints a ``ready`` line once it pulls.
- ``roundtrip-client``: ``--count`` sequential ``submit`` + ``result()`` after
  ``--warmup`` unmeasured ones, each one's latency in seconds.
- ``concurrency``: ``--count`` handlers that each sleep ``--sleep`` seconds, with
  ``--concurrency`` of them at once; wall time and RSS before and at full concurrency.
- ``longrun``: drains ``--count`` tasks (fed while it runs) and samples RSS along the way.
- ``drain-processes``: the drain with the worker in ``--processes`` processes, run by
  natrio's supervisor (what ``natrio worker --processes N`` runs) as ``drain-child``
  processes, each printing its count as it changes; figures of the stretch from the
  first one's start to the line that brought the sum to ``--count``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

import natrio

from .._supervisor import Supervisor, report_ready, run_supervisor, stop_when_supervisor_gone
from .workload import EMIT_PREFIX, TASK_TYPE, Job, JobDone, Meter, emit, rss_bytes, run_id

# The contestants watch their worker's counters at this interval: the worker has no
# "processed N" event, and a 1 ms poll costs it next to nothing.
_POLL = 0.001


def noop_worker(nc: natrio.Connection, concurrency: int) -> natrio.Worker:
    """A worker running the typed no-op every contestant runs."""
    worker = natrio.Worker(nc, concurrency=concurrency)

    @worker.handle_typed(TASK_TYPE)
    async def noop(ctx: natrio.TaskContext, job: Job) -> JobDone:
        return JobDone(job.n, True)

    return worker


async def drain(url: str, count: int, concurrency: int) -> dict[str, Any]:
    """Drain ``count`` queued tasks with a natrio worker running the typed no-op."""
    async with natrio.connect(url) as nc:
        worker = noop_worker(nc, concurrency)
        async with trio.open_nursery() as nursery:
            meter = Meter()
            await nursery.start(worker.run)
            while worker.statistics().dispatcher.processed < count:  # noqa: ASYNC110
                await trio.sleep(_POLL)
            await nc.flush()
            figures = meter.figures(count)
            worker.stop()
    return figures | {"concurrency": concurrency}


# What a drain child's count lines start with: "<processed> <cpu seconds> <time.time()>".
_PROGRESS = "PROGRESS "


async def drain_child(url: str, concurrency: int) -> dict[str, Any]:
    """One process of ``drain-processes``: serve the no-op, printing the count as it
    changes, until the supervisor stops it."""
    async with natrio.connect(url) as nc:
        worker = noop_worker(nc, concurrency)
        # The same stretch as ``drain``'s: from after the connect.
        started_at, cpu_start = time.time(), time.process_time()
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await natrio.run_worker(worker, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            report_ready(worker.worker_id, worker.shutdown_grace)
            nursery.start_soon(stop_when_supervisor_gone, worker.stop)
            shown = -1
            while True:
                processed = worker.statistics().dispatcher.processed
                if processed != shown:
                    shown = processed
                    cpu = time.process_time() - cpu_start
                    sys.stdout.write(f"{_PROGRESS}{processed} {cpu!r} {time.time()!r}\n")
                    sys.stdout.flush()
                await trio.sleep(_POLL)
    return {"started_at": started_at, "processed_at_exit": worker.statistics().dispatcher.processed}


async def drain_processes(url: str, count: int, concurrency: int, processes: int) -> dict[str, Any]:
    """Drain ``count`` queued tasks with the no-op worker in ``processes`` processes."""
    latest: dict[int, tuple[int, float, float]] = {}  # index: (processed, cpu, at)
    at_done: dict[int, tuple[int, float, float]] = {}
    finals: dict[int, dict[str, Any]] = {}
    done = trio.Event()  # all tasks done, or the supervisor ended

    def output(index: int, line: str, stderr: bool) -> None:
        if not stderr and line.startswith(_PROGRESS):
            processed, cpu, at = line[len(_PROGRESS) :].split()
            latest[index] = (int(processed), float(cpu), float(at))
            if not at_done and sum(entry[0] for entry in latest.values()) >= count:
                at_done.update(latest)
                done.set()
        elif not stderr and line.startswith(EMIT_PREFIX):
            finals[index] = json.loads(line[len(EMIT_PREFIX) :])
        else:
            # The bench keeps the end of a contestant's stderr for its failure message.
            sys.stderr.write(f"[{index}] {line}\n")

    argv = [sys.executable, "-m", "natrio._bench.contestants", "drain-child", "--url", url]
    argv += ["--concurrency", str(concurrency)]
    supervisor = Supervisor(
        lambda index: argv, processes, output=output, tell=lambda m: print(m, file=sys.stderr)
    )

    async def supervise(task_status: trio.TaskStatus[None]) -> None:
        try:
            await run_supervisor(supervisor, task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        # Stopped only once every process is ready: one stopped while it starts (which a
        # tiny run could finish before) would have no final figures to report.
        await nursery.start(supervise)
        await done.wait()
        supervisor.stop()
    restarts = sum(child.restarts for child in supervisor.statistics())
    if not at_done or restarts or len(finals) != processes:
        raise RuntimeError(
            f"the worker processes stopped with {sum(e[0] for e in latest.values())} of "
            f"{count} tasks done ({restarts} restarts, {len(finals)} final reports)"
        )
    seconds = max(at for _, _, at in at_done.values()) - min(
        final["started_at"] for final in finals.values()
    )
    cpu = sum(cpu for _, cpu, _ in at_done.values())
    children = []
    for index in sorted(finals):
        # One that had reported nothing when the others finished (still starting, in a
        # tiny run) did none of the stretch's work.
        processed, cpu_seconds, _ = at_done.get(index, (0, 0.0, 0.0))
        children.append(finals[index] | {"processed": processed, "cpu_seconds": cpu_seconds})
    return {
        "tasks": count,
        "seconds": seconds,
        "rate": count / seconds if seconds > 0 else 0.0,
        "cpu_seconds": cpu,
        "cpu_us_per_task": cpu / count * 1e6,
        "concurrency": concurrency,
        "processes": processes,
        # The workers' memory, not this process's (which only reads their lines).
        "rss_peak": sum(final["rss_peak"] for final in finals.values()),
        "children": children,
    }


async def _stop_at_end_of_stdin(worker: natrio.Worker) -> None:
    # The bench closes a server contestant's stdin to stop it; an orchestrator that died
    # closes it too, so the worker never outlives the run. The blocking read is abandoned
    # (not joined) when the worker stops for another reason first.
    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
    worker.stop()


async def roundtrip_worker(url: str, concurrency: int) -> dict[str, Any]:
    """Serve the typed no-op until SIGTERM, SIGINT or the end of stdin."""
    async with natrio.connect(url) as nc:
        worker = noop_worker(nc, concurrency)
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await natrio.run_worker(worker, task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve)
            emit({"ready": True, "worker_id": worker.worker_id})
            nursery.start_soon(_stop_at_end_of_stdin, worker)
        processed = worker.statistics().dispatcher.processed
    return {"processed": processed, "concurrency": concurrency}


async def roundtrip_client(url: str, count: int, warmup: int, round_: str) -> dict[str, Any]:
    """``count`` sequential submit + result() round trips after ``warmup`` unmeasured ones."""
    latencies: list[float] = []
    async with natrio.connect(url) as nc:
        client = natrio.Client(nc)
        for n in range(warmup + count):
            started = time.perf_counter()
            job = Job(n, f"job-{n}", 640)
            handle = await client.submit(TASK_TYPE, job, run_id=run_id(round_, n))
            done = await handle.result(JobDone)
            elapsed = time.perf_counter() - started
            if done.n != n:
                raise RuntimeError(f"task {n} returned the output of task {done.n}")
            if n >= warmup:
                latencies.append(elapsed)
    return {"latencies": latencies, "warmup": warmup}


async def concurrency(url: str, count: int, concurrency: int, sleep: float) -> dict[str, Any]:
    """``count`` handlers sleeping ``sleep`` s, ``concurrency`` at once: time and memory."""
    async with natrio.connect(url) as nc:
        worker = natrio.Worker(nc, concurrency=concurrency)

        @worker.handle_typed(TASK_TYPE)
        async def sleeper(ctx: natrio.TaskContext, job: Job) -> JobDone:
            await trio.sleep(sleep)
            return JobDone(job.n, True)

        full = min(count, concurrency)
        peak = 0
        rss_peak = rss_before = rss_bytes()
        peak_at = 0.0
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            await nursery.start(worker.run)
            while True:
                stats = worker.statistics().dispatcher
                if stats.in_flight > peak and peak < full:
                    # RSS is read when the count of running handlers first reaches a new
                    # high, so the figure at ``full`` is the memory of that many at once.
                    peak = stats.in_flight
                    rss_peak = rss_bytes()
                    peak_at = time.perf_counter() - started
                if stats.processed >= count:
                    break
                await trio.sleep(_POLL)
            await nc.flush()
            elapsed = time.perf_counter() - started
            worker.stop()
    return {
        "tasks": count,
        "concurrency": concurrency,
        "sleep": sleep,
        "seconds": elapsed,
        "peak_in_flight": peak,
        "peak_at": peak_at,
        "rss_before": rss_before,
        "rss_at_peak": rss_peak,
        "bytes_per_task": (rss_peak - rss_before) / peak if peak else None,
    }


async def longrun(
    url: str, count: int, concurrency: int, sample_every: int, marks: list[int]
) -> dict[str, Any]:
    """Drain ``count`` tasks, sampling RSS every ``sample_every`` tasks and at ``marks``."""
    wanted = sorted({*range(sample_every, count, sample_every), *marks, count} - {0})
    async with natrio.connect(url) as nc:
        worker = noop_worker(nc, concurrency)
        # Each sample is (tasks processed, RSS bytes, seconds since the worker started).
        samples: list[tuple[int, int, float]] = [(0, rss_bytes(), 0.0)]
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            await nursery.start(worker.run)
            index = 0
            while index < len(wanted):
                processed = worker.statistics().dispatcher.processed
                if processed >= wanted[index]:
                    samples.append((processed, rss_bytes(), time.perf_counter() - started))
                    while index < len(wanted) and wanted[index] <= processed:
                        index += 1
                    continue
                await trio.sleep(_POLL)
            await nc.flush()
            elapsed = time.perf_counter() - started
            worker.stop()
    return {
        "tasks": count,
        "seconds": elapsed,
        "rate": count / elapsed,
        "concurrency": concurrency,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one natrio contestant and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m natrio._bench.contestants")
    parser.add_argument(
        "name",
        choices=[
            "drain",
            "roundtrip-worker",
            "roundtrip-client",
            "concurrency",
            "longrun",
            "drain-processes",
            "drain-child",
        ],
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--round", dest="round_", default="rt")
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--sample-every", type=int, default=50_000)
    parser.add_argument("--mark", type=int, action="append", default=[])
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    rss_start = rss_bytes()
    figures: dict[str, Any]
    if args.name == "drain":
        figures = trio.run(drain, args.url, args.count, args.concurrency)
    elif args.name == "roundtrip-worker":
        figures = trio.run(roundtrip_worker, args.url, args.concurrency)
    elif args.name == "roundtrip-client":
        figures = trio.run(roundtrip_client, args.url, args.count, args.warmup, args.round_)
    elif args.name == "drain-processes":
        figures = trio.run(drain_processes, args.url, args.count, args.concurrency, args.processes)
    elif args.name == "drain-child":
        figures = trio.run(drain_child, args.url, args.concurrency)
    elif args.name == "concurrency":
        figures = trio.run(concurrency, args.url, args.count, args.concurrency, args.sleep)
    else:
        figures = trio.run(
            longrun, args.url, args.count, args.concurrency, args.sample_every, args.mark
        )
    emit(figures | {"rss_start": rss_start, "rss_end": rss_bytes()})


if __name__ == "__main__":
    main()
