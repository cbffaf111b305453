"""Cluster failover: SIGKILL the node leading the task stream, then the JetStream meta leader,
of a three-node cluster with every stream and bucket replicated three times, while two
worker processes (connected to all three nodes) work through a stream of tasks.

One node is down at a time (an R3 group keeps its quorum): kill the ``NATRIO_TASKS``
leader, wait until tasks submitted *after* the kill complete, restart the node and wait
until it reports itself healthy (caught up); then the same for the meta leader (or, if
that is the node killed first, another one). Tasks are submitted in three parts, the
second released at the first kill and the third at the second, so submissions meet
elections (a failed submit is retried with the same run id and step id, which the
stream's duplicate window makes safe) and "progress after the kill" is measured on
tasks that did not exist before it.

Checked at the end: every task has exactly one completion event, none is dead-lettered,
and the consumer has nothing pending. Completions are observed live by one connection
per node (so the node being down never hides them). The recovery time reported is the
longest stretch during which tasks were waiting (submitted or being submitted, not yet
complete) and none completed.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, TypeVar

import attrs
import trio

import natrio
from natrio._jetstream import JetStream

from . import harness
from .cluster import Cluster, open_cluster

TASKS = harness.pick(1_000, 20_000)
# Fractions of TASKS submitted at the start, at the first kill and at the second kill.
PARTS = (0.4, 0.3, 0.3)
WORKERS = 2
SUBMITTERS = 16
# The first kill comes once this fraction of all tasks has completed: the run is flowing.
KILL_AT = 0.15
# Completions of newly submitted tasks that count as "processing goes on".
PROGRESS = 50
ACK_WAIT = 5.0
TIME_BOUND = harness.pick(120.0, 900.0)
STEP_BOUND = 60.0  # for each step of the fault script

ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def run_id(index: int) -> str:
    return f"t{index:06d}"


def part_of(index: int, bounds: list[int]) -> int:
    return next(p for p, end in enumerate(bounds) if index < end)


def part_bounds() -> list[int]:
    ends, total = [], 0.0
    for fraction in PARTS:
        total += fraction
        ends.append(round(TASKS * total))
    ends[-1] = TASKS
    return ends


class Completions:
    """Completion events of ``work`` tasks as seen live, first sighting per run id, and when
    each task's first submit began."""

    def __init__(self, bounds: list[int]) -> None:
        self.bounds = bounds
        self.submitting: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self.per_part = [0] * len(bounds)
        self.received = 0
        self._changed = trio.Event()

    def saw(self, subject: str) -> None:
        # natrio.event.work.<run_id>.work.completed
        self.received += 1
        rid = subject.split(".")[3]
        if rid in self.first_seen:
            return
        self.first_seen[rid] = trio.current_time()
        self.per_part[part_of(int(rid[1:]), self.bounds)] += 1
        self._changed.set()
        self._changed = trio.Event()

    @property
    def distinct(self) -> int:
        return len(self.first_seen)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    def waits(self) -> list[tuple[float, float]]:
        """Every stretch during which some task was waiting (its submit begun, its completion
        not yet seen) and none completed, as (start, end).

        Idle time (every task submitted so far already done) does not count: the run
        submits in parts, so there are quiet moments that say nothing about recovery.
        """
        # At equal times a submit sorts before a completion (0 < 1).
        timeline = sorted(
            [(t, 0) for t in self.submitting.values()] + [(t, 1) for t in self.first_seen.values()]
        )
        waiting = 0
        since: float | None = None
        stretches = []
        for t, completed in timeline:
            if completed:
                waiting -= 1
                if since is not None:
                    stretches.append((since, t))
                since = t if waiting > 0 else None
            else:
                waiting += 1
                if since is None:
                    since = t
        return stretches

    def longest_wait(self, start: float = -math.inf, end: float = math.inf) -> tuple[float, float]:
        """The longest wait that overlaps ``start``..``end``: its length and when it began."""
        return max(
            ((b - a, a) for a, b in self.waits() if b >= start and a <= end), default=(0.0, 0.0)
        )


@asynccontextmanager
async def observing(urls: list[str], completions: Completions) -> AsyncIterator[None]:
    """One connection per node, each feeding every completion it sees into ``completions``."""
    async with AsyncExitStack() as stack:
        subs = []
        for url in urls:
            nc = await stack.enter_async_context(natrio.connect(url))
            subs.append(await nc.subscribe("natrio.event.work.*.work.completed"))
            await nc.flush()

        async def feed(sub: natrio.Subscription) -> None:
            async for msg in sub:
                completions.saw(msg.subject)

        async with trio.open_nursery() as nursery:
            for sub in subs:
                nursery.start_soon(feed, sub)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()


@attrs.define
class WorkerProcess:
    process: trio.Process
    log_path: Path
    worker_id: str = ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def read_ready(process: trio.Process) -> str:
    """The worker id from the process's ``READY <worker_id>`` line."""
    assert process.stdout is not None
    buffer = b""
    while b"\n" not in buffer:
        chunk = await process.stdout.receive_some()
        if not chunk:
            raise AssertionError("worker process ended before printing READY")
        buffer += chunk
    line = buffer.partition(b"\n")[0].decode()
    assert line.startswith("READY "), line
    return line.split()[1]


def open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # a local file, opened once per worker


@asynccontextmanager
async def worker_processes(
    urls: list[str], count: int, log_dir: Path
) -> AsyncIterator[list[WorkerProcess]]:
    """``count`` chaos workers connected to every node; SIGTERM'd (then killed) on exit."""
    workers: list[WorkerProcess] = []
    try:
        for n in range(count):
            log_path = log_dir / f"worker{n}.log"
            with open_log(log_path) as log:
                process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "tests.chaos.chaos_worker",
                        ",".join(urls),
                        "--ack-wait",
                        str(ACK_WAIT),
                        "--grace",
                        "1",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=ROOT,
                )
            workers.append(WorkerProcess(process, log_path))
        with trio.fail_after(30):
            for worker in workers:
                worker.worker_id = await read_ready(worker.process)
        yield workers
    finally:
        with trio.CancelScope(shield=True):
            for worker in workers:
                if worker.process.returncode is None:
                    worker.process.send_signal(signal.SIGTERM)
            for worker in workers:
                with trio.move_on_after(10):
                    await worker.process.wait()
                if worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()


@attrs.define
class Submissions:
    submitted: int = 0
    retries: int = 0
    retried_duplicates: int = 0  # a retry found the first attempt had been stored
    errors: dict[str, int] = attrs.Factory(dict)


async def submit_one(
    client: natrio.Client, index: int, stats: Submissions, completions: Completions
) -> None:
    completions.submitting[run_id(index)] = trio.current_time()
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            handle = await client.submit("work", run_id(index).encode(), run_id=run_id(index))
        except natrio.NatrioError as exc:
            # No stream leader yet, the connected node just died, ...: same ids again.
            stats.retries += 1
            key = f"{type(exc).__name__}: {re.sub(r't[0-9]{6}', '<run>', str(exc))}"
            stats.errors[key] = stats.errors.get(key, 0) + 1
            await trio.sleep(delay)  # backoff before retrying, not synchronisation
            delay = min(delay * 2, 1.0)
            continue
        if handle.duplicate:
            assert attempt > 1, f"{run_id(index)} reported duplicate on its first submit"
            stats.retried_duplicates += 1
        stats.submitted += 1
        return


async def submit_parts(
    client: natrio.Client,
    bounds: list[int],
    released: list[trio.Event],
    stats: Submissions,
    completions: Completions,
) -> None:
    """Submit each part of the tasks once its event is set, SUBMITTERS at a time."""
    send, receive = trio.open_memory_channel[int](0)

    async def submitter(receive: trio.MemoryReceiveChannel[int]) -> None:
        async with receive:
            async for index in receive:
                await submit_one(client, index, stats, completions)

    async with trio.open_nursery() as nursery:
        for _ in range(SUBMITTERS):
            nursery.start_soon(submitter, receive.clone())
        receive.close()
        async with send:
            start = 0
            for event, end in zip(released, bounds, strict=True):
                await event.wait()
                for index in range(start, end):
                    await send.send(index)
                start = end


@attrs.define
class Fault:
    node: str
    role: str
    killed_at: float
    new_work_done: float | None = None  # seconds until PROGRESS new tasks completed
    restarted_at: float | None = None
    healthy_after_restart: float | None = None  # seconds from restart to /healthz ok


async def retry_api(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` until it answers: during an election the API may time out or say
    'temporarily unavailable'. Bound it by the caller."""
    while True:
        try:
            return await call()
        except natrio.NatrioError:
            await trio.sleep(0.1)  # backoff before asking again


async def leaders(cluster: Cluster, nc: natrio.Connection) -> dict[str, str | None]:
    js = JetStream(nc, timeout=2.0)
    consumer = await retry_api(lambda: js.consumer_info("NATRIO_TASKS", "work~default"))
    return {
        "NATRIO_TASKS": await retry_api(lambda: cluster.stream_leader(nc, "NATRIO_TASKS")),
        "meta": await cluster.meta_leader(),
        "work consumer": (consumer.get("cluster") or {}).get("leader"),
        "NATRIO_EVENTS": await retry_api(lambda: cluster.stream_leader(nc, "NATRIO_EVENTS")),
    }


def roles_of(name: str, roles: dict[str, str | None]) -> str:
    led = [role for role, leader in roles.items() if leader == name]
    return "leader of " + ", ".join(led) if led else "no leader role"


async def diagnostics(
    nc: natrio.Connection,
    completions: Completions,
    stats: Submissions,
    workers: list[WorkerProcess],
    cluster: Cluster,
) -> str:
    lines = [
        f"submitted={stats.submitted} retries={stats.retries} errors={stats.errors}",
        f"completions seen: distinct={completions.distinct} per part={completions.per_part} "
        f"events received={completions.received}",
        f"live nodes: {[cluster.nodes[i].name for i in cluster.live()]}",
    ]
    with trio.move_on_after(5):
        try:
            info = await JetStream(nc, timeout=2.0).consumer_info("NATRIO_TASKS", "work~default")
            lines.append(
                "consumer work~default: "
                + str({k: info.get(k) for k in ("num_pending", "num_ack_pending", "num_waiting")})
                + f" leader={(info.get('cluster') or {}).get('leader')}"
            )
        except natrio.NatrioError as exc:
            lines.append(f"consumer info failed: {exc!r}")
    for n, worker in enumerate(workers):
        lines.append(f"--- worker {n} (returncode {worker.process.returncode}) log tail:")
        lines.append(worker.log_tail())
    return "\n".join(lines)


def more_than(completions: Completions, seen: int) -> Callable[[], bool]:
    return lambda: completions.distinct > seen


async def wait_for_all(
    nc: natrio.Connection,
    completions: Completions,
    step: Callable[[str, Callable[[], bool]], Awaitable[None]],
) -> None:
    """Wait until every task has completed: as seen live, or, should the observers have
    missed an event, as the events stream says once they have seen nothing for a while."""
    while True:
        with trio.move_on_after(5):
            await completions.wait_until(lambda: completions.distinct >= TASKS)
            return
        if (await harness.outcomes(nc, "work")).completed >= TASKS:
            return
        await step("waiting for every task", more_than(completions, completions.distinct))


async def test_cluster_failover(tmp_path: Path) -> None:
    bounds = part_bounds()
    completions = Completions(bounds)
    stats = Submissions()
    released = [trio.Event() for _ in PARTS]
    faults: list[Fault] = []
    with trio.fail_after(TIME_BOUND):
        async with (
            open_cluster() as cluster,
            natrio.connect(cluster.urls) as nc,
        ):
            with trio.fail_after(30):
                await retry_api(lambda: natrio.provision(nc, replicas=3))
            client = natrio.Client(nc, timeout=2.0)
            async with (
                observing(cluster.urls, completions),
                worker_processes(cluster.urls, WORKERS, tmp_path) as workers,
            ):

                async def step(what: str, condition: Callable[[], bool]) -> None:
                    with trio.move_on_after(STEP_BOUND) as scope:
                        await completions.wait_until(condition)
                    if scope.cancelled_caught:
                        raise AssertionError(
                            f"no progress within {STEP_BOUND:g} s: {what}\n"
                            f"faults so far: {faults}\n"
                            + await diagnostics(nc, completions, stats, workers, cluster)
                        )

                async def kill(i: int, role: str, part: int) -> Fault:
                    node = cluster.nodes[i]
                    await trio.to_thread.run_sync(cluster.kill, i)
                    fault = Fault(node.name, role, trio.current_time())
                    faults.append(fault)
                    released[part].set()
                    target = min(PROGRESS, bounds[part] - bounds[part - 1])
                    await step(
                        f"after killing {node.name} ({role}), waiting for {target} of the "
                        f"tasks submitted since",
                        lambda: completions.per_part[part] >= target,
                    )
                    fault.new_work_done = trio.current_time() - fault.killed_at
                    fault.restarted_at = trio.current_time()
                    await trio.to_thread.run_sync(cluster.restart, i)
                    with trio.fail_after(STEP_BOUND):
                        await cluster.wait_healthy(i)
                    fault.healthy_after_restart = trio.current_time() - fault.restarted_at
                    return fault

                async def fault_script() -> None:
                    await step(
                        "before any fault",
                        lambda: completions.distinct >= KILL_AT * TASKS,
                    )
                    with trio.fail_after(STEP_BOUND):
                        roles = await leaders(cluster, nc)
                    tasks_leader = roles["NATRIO_TASKS"]
                    assert tasks_leader is not None
                    first = cluster.index(tasks_leader)
                    await kill(first, roles_of(tasks_leader, roles), 1)

                    with trio.fail_after(STEP_BOUND):
                        roles = await leaders(cluster, nc)
                    meta = roles["meta"]
                    if meta is not None and meta != tasks_leader:
                        second = cluster.index(meta)
                    else:
                        # The meta leader is the node just restarted: take another one.
                        second = next(i for i in range(len(cluster.nodes)) if i != first)
                    name = cluster.nodes[second].name
                    await kill(second, roles_of(name, roles), 2)

                started = trio.current_time()
                released[0].set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(submit_parts, client, bounds, released, stats, completions)
                    nursery.start_soon(fault_script)
                await wait_for_all(nc, completions, step)
                elapsed = trio.current_time() - started
                dead_workers = [w for w in workers if w.process.returncode is not None]
                assert not dead_workers, await diagnostics(nc, completions, stats, workers, cluster)

                # The events stream is the record: read it, and wait out any ack lost with
                # the killed consumer leader (redelivered after ack_wait, then just acked).
                js_outcomes = await harness.outcomes(nc, "work")
                left: dict[str, int] | None = None
                with trio.move_on_after(4 * ACK_WAIT):
                    # Only observable by asking the server: poll.
                    while (left := await harness.pending(nc, "work")) != {  # noqa: ASYNC110
                        "ack_pending": 0,
                        "pending": 0,
                    }:
                        await trio.sleep(0.2)
                worker_logs = [w.log_tail(10) for w in workers]

    gap = completions.longest_wait()[0]
    fault_notes = "; ".join(
        f"killed {f.node} ({f.role}): longest wait {stall:.2f} s, "
        f"{PROGRESS} tasks submitted since done after {f.new_work_done or 0:.2f} s, "
        f"healthy {f.healthy_after_restart or 0:.2f} s after restart"
        for f in faults
        for stall in [completions.longest_wait(f.killed_at, f.restarted_at or math.inf)[0]]
    )
    harness.report(
        harness.ScenarioResult(
            scenario="Cluster failover",
            load=f"{TASKS} work tasks, {WORKERS} worker processes, 3-node cluster, R3",
            faults="SIGKILL the NATRIO_TASKS leader, restart; SIGKILL the meta leader, restart",
            submitted=stats.submitted,
            completed=js_outcomes.completed,
            dead_lettered=js_outcomes.dead,
            lost=TASKS - js_outcomes.completed,
            duplicate_completions=js_outcomes.duplicates,
            recovery_seconds=gap,
            notes=f"{fault_notes}; {stats.retries} submit retries "
            f"({stats.retried_duplicates} found the first attempt stored); run {elapsed:.1f} s",
        )
    )
    assert stats.submitted == TASKS
    assert js_outcomes == harness.Outcomes(completed=TASKS, duplicates=0, dead=0), worker_logs
    assert left == {"ack_pending": 0, "pending": 0}, f"consumer work~default still has {left}"
    assert len(faults) == 2
