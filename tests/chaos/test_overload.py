"""Scenario 7, overload and memory: a large backlog through a worker with concurrency 16.

The worker (its own process, so its memory is its own) pulls a bounded window no matter
how long the backlog is: its resident memory must not grow with the backlog, and its
throughput should hold from the first quarter to the last (reported, not asserted).
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import trio

import natrio

from . import harness


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def test_backlog_keeps_memory_bounded(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
) -> None:
    total = harness.pick(4000, 200_000)
    js = natrio_client.js
    with trio.fail_after(harness.pick(60, 600)):
        for start in range(0, total, 500):
            async with trio.open_nursery() as nursery:
                for i in range(start, min(total, start + 500)):
                    nursery.start_soon(js.publish, f"natrio.task.work.default.r{i}.s", b"x" * 64)
    completed = await natrio_connection.subscribe("natrio.event.work.*.*.completed")
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tests.chaos.chaos_worker",
            natrio_server.url,
            "--concurrency",
            "16",
            "--max-ms",
            "0",
        ],
        stdout=subprocess.DEVNULL,
    )
    samples: list[tuple[int, float]] = []
    quarter_times: list[float] = []
    try:
        with trio.fail_after(harness.pick(120, 1800)):
            done = 0
            began = trio.current_time()
            next_sample = 0
            while done < total:
                await completed.receive()
                done += 1
                if done >= next_sample:
                    samples.append((done, rss_mb(process.pid)))
                    next_sample += max(1, total // 40)
                if done % (total // 4) == 0:
                    quarter_times.append(trio.current_time())
        elapsed = trio.current_time() - began
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()
    counted = await harness.outcomes(natrio_connection, "work")
    left = await harness.pending(natrio_connection, "work")
    # Memory after a tenth of the backlog versus the peak: the window is bounded, so the
    # backlog's length must not show up in the worker's memory.
    early = max(rss for done, rss in samples if done <= total // 10)
    peak = max(rss for _, rss in samples)
    edges = [began, *quarter_times]
    rates = [(total / 4) / (b - a) for a, b in itertools.pairwise(edges)]
    harness.report(
        harness.ScenarioResult(
            scenario="Overload and memory",
            load=f"{total} tasks backlog, concurrency 16",
            faults="none (backlog)",
            submitted=total,
            completed=counted.completed,
            dead_lettered=counted.dead,
            lost=total - counted.completed - counted.dead,
            duplicate_completions=counted.duplicates,
            notes=(
                f"peak RSS {peak:.1f} MiB (at 10%: {early:.1f} MiB); "
                f"tasks/s by quarter {' / '.join(f'{r:.0f}' for r in rates)}; {total / elapsed:.0f} tasks/s overall"
            ),
        )
    )
    assert counted.completed == total
    assert counted.duplicates == 0
    assert left == {"ack_pending": 0, "pending": 0}
    assert peak - early < 30, samples
