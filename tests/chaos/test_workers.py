"""Scenarios 1-4: worker crashes, server restarts, bounded shutdown under load, poison tasks.

Every scenario runs a real nats-server and real worker processes
(``python -m tests.chaos.chaos_worker``); faults are real signals to real processes
(SIGKILL, SIGTERM) and real server kills and restarts on the same port and store. Progress
is followed on the core events subjects; final counts come from the events stream
(:func:`harness.outcomes`) and the task consumer (:func:`harness.settled_pending`).
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial

import attrs
import trio

import natrio
from natrio._jetstream import JetStream

from .. import procs
from . import harness
from .harness import wait_finished, watch_events

# Submits run concurrently, this many at a time.
BATCH = 200
NOTHING_LEFT = harness.NOTHING_LEFT


def worker_pool(url: str) -> AbstractAsyncContextManager[procs.WorkerPool]:
    """Chaos worker processes against ``url``, all killed and reaped on the way out."""
    return procs.WorkerPool(url, "tests.chaos.chaos_worker").running()


async def settled_pending(nc: natrio.Connection, task_type: str) -> dict[str, int]:
    """What is left on ``task_type``'s consumer once nothing is, or after 20 s."""
    return await harness.settled_pending(nc, [f"{task_type}~default"])


# -- following outcomes ------------------------------------------------------------------


async def events_by_run(nc: natrio.Connection, task_type: str, kind: str) -> dict[str, int]:
    """How many ``kind`` events the events stream holds for each run of ``task_type``."""
    subjects = await JetStream(nc, timeout=30.0).subjects(
        "NATRIO_EVENTS", f"natrio.event.{task_type}.*.*.{kind}"
    )
    return {subject.split(".")[3]: count for subject, count in subjects.items()}


# -- submitting --------------------------------------------------------------------------


@attrs.define
class Submitted:
    tasks: int = 0
    duplicates: int = 0  # submits the stream recognised as a repeat (after a lost PubAck)
    retries: int = 0  # submits that raised and were tried again


async def submit_all(
    client: natrio.Client,
    total: int,
    payload: Callable[[int], bytes],
    *,
    task_type: str = "work",
    per_second: float | None = None,
    retry: bool = False,
) -> Submitted:
    """Submit tasks ``r0`` .. ``r<total-1>``, up to ``BATCH`` at a time concurrently.

    With ``per_second``, tasks arrive at that steady rate (in slices every 0.2 s) so that
    the run spans the faults; without, as fast as the server takes them. With ``retry``,
    a submit that raises (server down, JetStream not ready yet) is tried again with the
    same run id and step id: the stream's dedupe makes that safe, and the task counts once.
    """
    result = Submitted()

    async def one(i: int) -> None:
        while True:
            try:
                handle = await client.submit(task_type, payload(i), run_id=f"r{i}")
            except natrio.ConfigurationError:
                raise
            except natrio.NatrioError:
                if not retry:
                    raise
                result.retries += 1
                await trio.sleep(0.2)  # back off before trying again
                continue
            result.tasks += 1
            result.duplicates += handle.duplicate
            return

    step = BATCH if per_second is None else max(1, min(BATCH, round(per_second * 0.2)))
    began = trio.current_time()
    for start in range(0, total, step):
        if per_second is not None:
            await trio.sleep_until(began + start / per_second)  # the arrival rate
        async with trio.open_nursery() as nursery:
            for i in range(start, min(total, start + step)):
                nursery.start_soon(one, i)
    return result


# -- scenarios ---------------------------------------------------------------------------


async def test_worker_crashes(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Scenario 1: every 1-2 s a random worker of three is SIGKILLed and replaced."""
    total = harness.pick(1500, 20_000)
    # Tasks arrive at a steady rate (well under what three workers manage) so that the
    # run spans many crashes; at full speed it would be over before the first.
    rate = harness.pick(250, 1000)
    period = harness.pick(1.0, 2.0)
    options = ("--ack-wait", "2", "--max-ms", "20")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    client = natrio.Client(natrio_connection)
    killed_at: dict[str, float] = {}  # worker id: when it was SIGKILLed
    with trio.fail_after(harness.pick(120, 1200)):
        async with (
            worker_pool(natrio_server.url) as pool,
            watch_events(natrio_connection, "work") as watch,
        ):
            for _ in range(3):
                await pool.start(*options)

            async def crash_workers() -> None:
                while True:
                    await trio.sleep(period)  # the load pattern: a crash every period
                    victim = rng.choice(pool.alive)
                    await pool.kill(victim)
                    killed_at[victim.worker_id] = trio.current_time()
                    await pool.start(*options)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(crash_workers)
                began = trio.current_time()
                submitted = await submit_all(
                    client, total, lambda i: b"task-%d" % i, per_second=rate
                )
                await wait_finished(natrio_connection, watch, "work", total)
                elapsed = trio.current_time() - began
                nursery.cancel_scope.cancel()
            left = await settled_pending(natrio_connection, "work")
            counted = await harness.outcomes(natrio_connection, "work")
            gap = watch.longest_gap()
            # Tasks a crashed worker had started, from the crash to their completion elsewhere.
            taken_over = [
                watch.completed_at.get(run_id, math.inf) - killed_at[worker]
                for run_id, worker in watch.first_worker.items()
                if worker in killed_at and run_id in watch.rerun
            ]
    kills = len(killed_at)
    result = harness.ScenarioResult.of(
        counted,
        scenario="Worker crashes",
        load=f"{total} tasks at {rate}/s, 3 worker processes (concurrency 32), handlers 0-20 ms",
        faults=f"SIGKILL a random worker every {period:g} s and start a new one (ack_wait 2 s)",
        submitted=submitted.tasks,
        recovery_seconds=gap,
        notes=(
            f"{kills} workers killed; {len(watch.rerun)} tasks run again after a crash; "
            f"those a killed worker was running ({len(taken_over)}) completed elsewhere "
            f"within {max(taken_over, default=0.0):.2f} s of the kill (ack_wait 2 s); "
            "recovery = longest gap between completion events; "
            f"{elapsed:.1f} s in all; seed {seed}"
        ),
    )
    harness.report(result)
    assert submitted.tasks == total
    assert kills >= 2
    assert result.lost == 0
    assert counted == harness.Outcomes(completed=total, duplicates=0, dead=0)
    assert left == NOTHING_LEFT


async def test_server_restarts(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Scenario 2: the server is SIGKILLed and restarted (same port and store) twice."""
    total = harness.pick(1500, 20_000)
    # A steady arrival rate, so that submits meet the outages too.
    rate = harness.pick(250, 1000)
    # Longer than the client's request timeout (2 s), so that submits caught by an outage
    # time out and are retried.
    downtime = 3.0
    client = natrio.Client(natrio_connection, timeout=2.0)
    back_at: list[float] = []
    restarts_done = trio.Event()
    with trio.fail_after(harness.pick(120, 1200)):
        async with (
            worker_pool(natrio_server.url) as pool,
            watch_events(natrio_connection, "work") as watch,
        ):
            for _ in range(2):
                await pool.start("--max-ms", "20")

            async def restart_server() -> None:
                for fraction in (1 / 3, 2 / 3):
                    await watch.reached(int(total * fraction))
                    await trio.to_thread.run_sync(natrio_server.kill)
                    await trio.sleep(downtime)  # the fault: the server stays down this long
                    await trio.to_thread.run_sync(natrio_server.start)
                    back_at.append(trio.current_time())
                restarts_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_server)
                began = trio.current_time()
                submitted = await submit_all(
                    client, total, lambda i: b"task-%d" % i, per_second=rate, retry=True
                )
                await wait_finished(natrio_connection, watch, "work", total)
                await restarts_done.wait()
                elapsed = trio.current_time() - began
            left = await settled_pending(natrio_connection, "work")
            counted = await harness.outcomes(natrio_connection, "work")
            # Processing resumed: first completion seen after each restart.
            resumed = [
                min((t for t in watch.completion_times if t > back), default=math.inf) - back
                for back in back_at
            ]
            gap = watch.longest_gap()
            assert all(pool_worker.alive for pool_worker in pool.processes), "a worker died"
    result = harness.ScenarioResult.of(
        counted,
        scenario="Server restarts",
        load=f"{total} tasks at {rate}/s, 2 worker processes (concurrency 32), handlers 0-20 ms",
        faults=(
            f"nats-server SIGKILLed after 1/3 and 2/3 of the tasks completed, "
            f"restarted {downtime:g} s later on the same port and file store"
        ),
        submitted=submitted.tasks,
        recovery_seconds=gap,
        notes=(
            "recovery = longest gap between completion events (includes the downtime); "
            f"first completion {' / '.join(f'{r:.2f}' for r in resumed)} s after each restart; "
            f"{len(watch.rerun)} tasks seen run again; "
            f"{submitted.retries} submits retried, {submitted.duplicates} recognised as "
            f"duplicates; {elapsed:.1f} s in all"
        ),
    )
    harness.report(result)
    assert len(back_at) == 2
    assert submitted.tasks == total
    assert result.lost == 0
    assert counted == harness.Outcomes(completed=total, duplicates=0, dead=0)
    assert left == NOTHING_LEFT


async def test_shutdown_under_load(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Scenario 3: SIGTERM a worker holding 100 running tasks; another takes them at once."""
    count = 100
    grace = 2.0
    options = (
        "--concurrency",
        str(count),
        "--grace",
        f"{grace:g}",
        "--slow-s",
        "10",
        "--ack-wait",
        "30",
    )
    client = natrio.Client(natrio_connection)
    with trio.fail_after(60):
        async with worker_pool(natrio_server.url) as pool:
            first = await pool.start(*options)
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(partial(client.submit, "slow", run_id=f"s{i}"))
            held: set[str] = set()
            with trio.fail_after(30):
                while len(held) < count:
                    held.add((await first.expect("STARTED"))[1].split()[1])
            assert held == {f"s{i}" for i in range(count)}
            second = await pool.start(*options)

            signalled = trio.current_time()
            first.process.send_signal(signal.SIGTERM)
            with trio.fail_after(grace + 1.0):  # the bound under test: exit within 3 s
                status = await first.process.wait()
            exited = trio.current_time()
            assert status == 0
            assert exited - signalled <= grace + 1.0

            taken: dict[str, float] = {}
            # The bound under test is 1 s after the first worker exited; the slack covers
            # the second process printing and this one reading its output.
            with trio.fail_after(1.5):
                while len(taken) < count:
                    at, line = await second.expect("STARTED")
                    taken.setdefault(line.split()[1], at)
            last_taken = max(taken.values())
            hand_over = max(0.0, last_taken - exited)

            await pool.terminate(second, grace + 1.0 + 2.0)
        counted = await harness.outcomes(natrio_connection, "slow")
        left = await harness.pending(natrio_connection, "slow")
        info = await JetStream(natrio_connection).stream_info(
            "NATRIO_TASKS", subjects_filter="natrio.task.slow.>"
        )
        stored = sum(((info.get("state") or {}).get("subjects") or {}).values())
    # Unfinished tasks are not lost while they are still on the consumer: the next worker
    # gets them.
    on_consumer = left["ack_pending"] + left["pending"]
    lost = count - counted.completed - counted.dead - on_consumer
    harness.report(
        harness.ScenarioResult.of(
            counted,
            scenario="Bounded shutdown under load",
            load=f"{count} running 10 s tasks in one worker (concurrency {count}, ack_wait 30 s)",
            faults=f"SIGTERM with a {grace:g} s grace period; a second worker standing by",
            submitted=count,
            lost=lost,
            recovery_seconds=hand_over,
            notes=(
                f"first worker exited {exited - signalled:.2f} s after SIGTERM; the second had "
                f"started all {count} {last_taken - signalled:.2f} s after SIGTERM "
                f"({hand_over:.2f} s after the exit); {on_consumer} left on the consumer, "
                f"{stored} in the task stream after stopping the second"
            ),
        )
    )
    assert set(taken) == held
    assert lost == 0
    assert counted.duplicates == 0
    assert stored == count - counted.completed - counted.dead


async def test_poison_tasks(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Scenario 4: 1% of tasks always raise: three attempts each, then the dead-letter stream."""
    total = harness.pick(1000, 10_000)
    poison = {f"r{i}" for i in range(0, total, 100)}
    attempts = 3
    options = ("--max-attempts", str(attempts), "--initial-interval", "0.05", "--max-ms", "20")
    client = natrio.Client(natrio_connection)

    def payload(i: int) -> bytes:
        return b"poison-%d" % i if f"r{i}" in poison else b"task-%d" % i

    with trio.fail_after(harness.pick(60, 600)):
        async with (
            worker_pool(natrio_server.url) as pool,
            watch_events(natrio_connection, "work") as watch,
        ):
            for _ in range(2):
                await pool.start(*options)
            submitted = await submit_all(client, total, payload)
            counted = await wait_finished(natrio_connection, watch, "work", total)
            left = await settled_pending(natrio_connection, "work")
        failed = await events_by_run(natrio_connection, "work", "failed")
        dead = await events_by_run(natrio_connection, "work", "dead")
        started = await events_by_run(natrio_connection, "work", "started")
        letters = [entry async for entry in client.dead_letters("work")]
    result = harness.ScenarioResult.of(
        counted,
        scenario="Poison tasks",
        load=f"{total} tasks, 1% always raising; 2 worker processes",
        faults=f"{len(poison)} poison tasks, RetryPolicy maximum_attempts={attempts}",
        submitted=submitted.tasks,
        dead_lettered=len(letters),
        notes=(
            f"every poison task attempted {attempts} times "
            f"({attempts - 1} failed events + 1 dead event) and dead-lettered"
        ),
    )
    harness.report(result)
    assert submitted.tasks == total
    assert result.lost == 0
    assert counted == harness.Outcomes(
        completed=total - len(poison), duplicates=0, dead=len(poison)
    )
    assert failed == dict.fromkeys(poison, attempts - 1)
    assert dead == dict.fromkeys(poison, 1)
    assert {run: started.get(run) for run in poison} == dict.fromkeys(poison, attempts)
    assert {entry.run_id for entry in letters} == poison
    assert {(entry.attempts, entry.error.kind) for entry in letters} == {(attempts, "exhausted")}
    assert left == NOTHING_LEFT
