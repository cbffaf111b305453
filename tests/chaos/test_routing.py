"""Routing failover: partitions and singletons across real worker processes.

Every scenario runs a real nats-server and real worker processes
(``python -m tests.chaos.routing_worker``) that print a ledger line as each handler starts
and as it returns (key, sequence number within the key, partition, worker id,
``time.time()``); faults are real signals (SIGTERM, SIGKILL). The ledger shows what ran
where and when; final counts come from the events stream (:func:`harness.outcomes`).

- Partition failover: a partitioned task type, tasks for many keys flowing all along, the
  members going 1 -> 2 -> 3 -> 2 (SIGTERM) -> 3 -> 2 (SIGKILL). Checked: per key the tasks
  complete in submit order (only the task a killed process was running may run again), no
  two executions of one partition (so of one key) overlap, the directory shows every
  member holding ⌊n/k⌋ or ⌈n/k⌉ partitions once settled, and every partition that moved
  is served by its new holder within 2 s of a join (the new worker's READY) or of the
  clean stop, and within the directory TTL + 2 s of the kill (the partition consumers'
  ack wait is capped at the TTL: the handlers' own is 10 s).
- Singleton failover: three processes serve a singleton task type; SIGTERM the one
  running a task (failover at once), then SIGKILL the next holder while its task runs
  (failover within the handler's ack_wait + 1 s). Checked: no two executions overlap,
  and the two gaps.

Both: no task lost, no duplicate completion event, nothing left on the consumers.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TypeVar

import attrs
import trio

import natrio
from natrio._jetstream import JetStream
from natrio._routing.placement import partition_of

from .. import procs
from . import harness
from .harness import wait_finished, watch_events

# How often to look again at what only the server can tell (the directory, stored events,
# consumer state).
POLL = 0.1
GRACE = 5.0  # the workers' shutdown grace (their handlers take far less)
# The bound a worker promises for a clean stop, plus slack for the process's own exit.
STOP_WITHIN = GRACE + 1.0 + 2.0

T = TypeVar("T")
Holdings = dict[str, tuple[int, ...]]  # worker id: the partitions it holds


# -- the ledger ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Execution:
    """One handler execution, as its worker's ledger lines tell it (times are ``time.time()``)."""

    task_type: str
    key: str
    seq: int
    partition: int | None
    worker: str
    start: float
    end: float | None = None  # None: it never returned
    killed: bool = False  # its process was SIGKILLed (before or after it returned)
    cut: float | None = None  # when its process was known dead, if it never returned

    @property
    def finish(self) -> float:
        """When it stopped running: it returned, or its process died."""
        if self.end is not None:
            return self.end
        return math.inf if self.cut is None else self.cut


class Ledger:
    """Every execution the worker processes reported, in the order their lines arrived;
    :meth:`until` waits for a condition on it."""

    def __init__(self) -> None:
        self.executions: list[Execution] = []
        self._open: dict[tuple[str, str, str, int], Execution] = {}
        self._changed = trio.Event()

    def add(self, line: str) -> None:
        mark, *fields = line.split()
        if mark not in ("START", "END") or len(fields) != 6:
            return
        task_type, key, seq, partition, worker, at = fields
        ident = (worker, task_type, key, int(seq))
        if mark == "START":
            execution = Execution(
                task_type,
                key,
                int(seq),
                None if partition == "-" else int(partition),
                worker,
                float(at),
            )
            self._open[ident] = execution
            self.executions.append(execution)
        else:
            self._open.pop(ident).end = float(at)
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def killed(self, worker: str, dead_at: float) -> None:
        """``worker``'s process was SIGKILLed and known dead at ``dead_at``."""
        for execution in self.executions:
            if execution.worker == worker:
                execution.killed = True
                if execution.end is None:
                    execution.cut = dead_at

    async def until(self, found: Callable[[], T | None]) -> T:
        """``found()`` once it is not None, looked at again after every ledger line."""
        while (value := found()) is None:
            await self._changed.wait()
        return value


# -- worker processes ----------------------------------------------------------------------


def routing_pool(url: str, ledger: Ledger) -> AbstractAsyncContextManager[procs.WorkerPool]:
    """Routing worker processes against ``url``, their ledger lines fed into ``ledger``; all
    killed and reaped on the way out."""
    return procs.WorkerPool(url, "tests.chaos.routing_worker", on_line=ledger.add).running()


async def kill(pool: procs.WorkerPool, ledger: Ledger, worker: procs.WorkerProcess) -> None:
    """SIGKILL ``worker`` and reap it; returns once all it printed is in the ledger, its
    executions marked killed."""
    ledger.killed(worker.worker_id, await pool.kill(worker))


# -- submitting and following --------------------------------------------------------------


@attrs.define
class Feed:
    """What was submitted: per key the count (sequence numbers 0 .. count-1), and when each
    submit began (``time.time()``; the task could not have waited from any earlier)."""

    counts: dict[str, int] = attrs.field(factory=lambda: defaultdict(int))
    submitted_at: dict[tuple[str, int], float] = attrs.field(factory=dict)
    total: int = 0


async def feed(
    client: natrio.Client,
    task_type: str,
    keys: Sequence[str],
    per_second: float,
    payload: Callable[[str, int], bytes],
    record: Feed,
    stop: trio.Event,
    *,
    keyed: bool,
) -> None:
    """Submit tasks at ``per_second`` until ``stop``, the keys in turn.

    Every slice submits one task for each of up to ``len(keys)`` distinct keys
    concurrently, and the next slice starts once all of them are stored: a key's tasks are
    submitted one after the other, each with the next sequence number. Stopping is
    checked between slices only, so every counted task was stored.
    """
    per_slice = max(1, round(per_second * 0.1))
    assert per_slice <= len(keys), "a slice would submit two tasks of one key at once"
    interval = per_slice / per_second
    cycle = itertools.cycle(keys)
    began = trio.current_time()

    async def one(key: str, seq: int) -> None:
        record.submitted_at[(key, seq)] = time.time()
        await client.submit(
            task_type,
            payload(key, seq),
            run_id=f"{key}-{seq}",
            key=key if keyed else None,
        )
        record.total += 1

    for n in itertools.count(1):
        async with trio.open_nursery() as nursery:
            for key in itertools.islice(cycle, per_slice):
                nursery.start_soon(one, key, record.counts[key])
                record.counts[key] += 1
        with trio.move_on_at(began + n * interval):  # the arrival rate
            await stop.wait()
        if stop.is_set():
            return


async def directory_ttl(nc: natrio.Connection) -> float:
    """The worker directory's TTL (what provision's ``worker_ttl`` set)."""
    info = await JetStream(nc).stream_info("KV_natrio_workers")
    return float(info["config"]["max_age"]) / 1e9


# -- checks --------------------------------------------------------------------------------


def overlaps(executions: Iterable[Execution], by: Callable[[Execution], object]) -> list[str]:
    """Executions of one group (``by``) that ran at the same time as an earlier one."""
    groups: dict[object, list[Execution]] = defaultdict(list)
    for execution in executions:
        groups[by(execution)].append(execution)
    found = []
    for group, members in groups.items():
        members.sort(key=lambda e: e.start)
        busy_until, busy = -math.inf, None
        for execution in members:
            if busy is not None and execution.start < busy_until:
                found.append(
                    f"{group}: {execution.key}#{execution.seq} on {execution.worker} started "
                    f"{busy_until - execution.start:.3f} s before {busy.key}#{busy.seq} on "
                    f"{busy.worker} stopped"
                )
            if execution.finish > busy_until:
                busy_until, busy = execution.finish, execution
    return found


def order_violations(executions: Iterable[Execution], counts: Mapping[str, int]) -> list[str]:
    """Per key, executions (by start time) that break submit order; and keys whose tasks
    did not all return.

    An execution must run the key's next task (the one after the last that returned), or
    run again the task of the execution just before it if that one was in a process that
    was SIGKILLed (its outcome may not have been recorded). Every execution must return,
    unless its process was SIGKILLed.
    """
    by_key: dict[str, list[Execution]] = defaultdict(list)
    for execution in executions:
        by_key[execution.key].append(execution)
    found = []
    for key, runs in by_key.items():
        runs.sort(key=lambda e: e.start)
        following = 0
        previous: Execution | None = None
        for execution in runs:
            repeat = previous is not None and previous.killed and execution.seq == previous.seq
            if execution.seq != following and not repeat:
                found.append(
                    f"{key}: #{execution.seq} started on {execution.worker} while #{following} "
                    "was the next to run"
                )
            if execution.end is None and not execution.killed:
                found.append(f"{key}: #{execution.seq} on {execution.worker} never returned")
            if execution.end is not None and execution.seq == following:
                following += 1
            previous = execution
        if following != counts.get(key, 0):
            found.append(f"{key}: {following} of {counts.get(key, 0)} tasks returned in order")
    return found


def running(ledger: Ledger, since: float, worker: str | None = None) -> Execution | None:
    """An execution started after ``since`` (on ``worker``) and still running."""
    for execution in reversed(ledger.executions):
        if execution.start < since:
            return None
        if execution.end is None and worker in (None, execution.worker):
            return execution
    return None


def repeats(executions: Iterable[Execution]) -> int:
    """Executions beyond the first of the same task."""
    seen = [(e.task_type, e.key, e.seq) for e in executions]
    return len(seen) - len(set(seen))


def balanced(held: Holdings, partitions: int) -> bool:
    """Every partition held by exactly one member, each holding ⌊n/k⌋ or ⌈n/k⌉."""
    if not held:
        return False
    every = sorted(p for parts in held.values() for p in parts)
    sizes = {len(parts) for parts in held.values()}
    return every == list(range(partitions)) and sizes <= {
        partitions // len(held),
        -(-partitions // len(held)),
    }


async def settled(
    nc: natrio.Connection, live: Iterable[procs.WorkerProcess], partitions: int, within: float
) -> Holdings:
    """The directory's holdings once it lists exactly the ``live`` workers, none stopping,
    holding the partitions of ``keyed`` in balance; fails after ``within`` s."""
    ids = {worker.worker_id for worker in live}
    last: list[natrio.WorkerInfo] = []
    with trio.move_on_after(within):
        while True:
            last = await natrio.list_workers(nc)
            held = {w.worker_id: w.partitions.get("keyed/default", ()) for w in last}
            if (
                set(held) == ids
                and not any(w.stopping for w in last)
                and balanced(held, partitions)
            ):
                return held
            # Polled (ASYNC110): the directory is a KV bucket read on demand, as the
            # workers read it.
            await trio.sleep(POLL)
    seen = {(w.worker_id, w.stopping): w.partitions for w in last}
    raise AssertionError(f"not settled within {within:g} s: live {sorted(ids)}, directory {seen}")


def handover(
    executions: Sequence[Execution],
    fault: float,
    before: Holdings,
    after: Holdings,
    submitted_at: Mapping[tuple[str, int], float],
) -> dict[int, float]:
    """For every partition whose holder changed from ``before`` to ``after``: the time from
    the fault to the first start of one of its tasks by the new holder, counted from when
    that task was submitted if it came after the fault (so only waiting counts)."""
    owner_before = {p: w for w, parts in before.items() for p in parts}
    owner_after = {p: w for w, parts in after.items() for p in parts}
    served: dict[int, float] = {}
    for partition, holder in sorted(owner_after.items()):
        if owner_before.get(partition) == holder:
            continue
        first = min(
            (
                e
                for e in executions
                if e.partition == partition and e.worker == holder and e.start >= fault
            ),
            key=lambda e: e.start,
            default=None,
        )
        if first is None:
            served[partition] = math.inf
        else:
            waiting_since = max(fault, submitted_at[(first.key, first.seq)])
            served[partition] = first.start - waiting_since
    return served


def keys_for(partitions: int, per_partition: int) -> list[str]:
    """Keys ``k<i>``, ``per_partition`` of them falling in each partition."""
    keys: list[str] = []
    taken: dict[int, int] = defaultdict(int)
    for i in itertools.count():
        key = f"k{i}"
        partition = partition_of(key, partitions)
        if taken[partition] < per_partition:
            taken[partition] += 1
            keys.append(key)
            if len(keys) == partitions * per_partition:
                return keys
    raise AssertionError("unreachable")


def summary(held: Holdings) -> str:
    return "+".join(str(len(parts)) for parts in held.values())


# -- scenarios -----------------------------------------------------------------------------


async def test_partition_failover(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Partitions: per-key order, no overlap, balance and bounded hand-over while the
    members go 1 -> 2 -> 3 -> 2 (SIGTERM) -> 3 -> 2 (SIGKILL) under a steady flow."""
    partitions = harness.pick(8, 16)
    keys = keys_for(partitions, harness.pick(4, 8))
    rate = harness.pick(120, 300)
    dwell = harness.pick(1.0, 5.0)  # seconds of flow in every settled membership
    handler_ms = 20
    # ack_wait 10 s: the partition consumers must use the directory TTL instead.
    options = (
        "--partitions",
        str(partitions),
        "--ack-wait",
        "10",
        "--grace",
        f"{GRACE:g}",
        "--keyed-ms",
        str(handler_ms),
    )
    ttl = await directory_ttl(natrio_connection)
    kill_bound = ttl + 2.0
    stop_bound = 2.0
    settle_bound = ttl + 8.0
    client = natrio.Client(natrio_connection)
    ledger = Ledger()
    record = Feed()
    states: list[str] = []
    with trio.fail_after(harness.pick(90, 300)):
        async with (
            routing_pool(natrio_server.url, ledger) as pool,
            watch_events(natrio_connection, "keyed") as watch,
        ):

            async def settle() -> Holdings:
                held = await settled(natrio_connection, pool.alive, partitions, settle_bound)
                states.append(summary(held))
                return held

            async def flow() -> None:
                await trio.sleep(dwell)  # the load pattern: tasks flow this long

            async def join(before: Holdings) -> tuple[float, Holdings, Holdings]:
                # One more member: when it was serving, and the holdings before and after.
                await pool.start(*options)
                return time.time(), before, await settle()

            began = trio.current_time()
            await pool.start(*options)
            one = await settle()
            joins: list[tuple[float, Holdings, Holdings]] = []
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        feed,
                        client,
                        "keyed",
                        keys,
                        rate,
                        lambda key, seq: json.dumps({"key": key, "seq": seq}).encode(),
                        record,
                        stop,
                        keyed=True,
                    )
                )
                await flow()
                joins.append(await join(one))
                await flow()
                joins.append(await join(joins[-1][2]))
                three = joins[-1][2]
                await flow()

                # A clean stop: the worker marks itself stopping, the others take over.
                leaving = pool.by_id(sorted(three)[1])
                stopped = time.time()
                await pool.terminate(leaving, STOP_WITHIN)
                after_stop = await settle()
                await flow()

                joins.append(await join(after_stop))
                three_again = joins[-1][2]
                await flow()

                # A crash, just as one of the victim's handlers started: its partitions wait
                # for the directory entry to expire, the tasks it was running for the ack
                # wait (capped at the TTL).
                victim = pool.by_id(sorted(three_again)[0])
                now = time.time()
                await ledger.until(lambda: running(ledger, now, victim.worker_id))
                crashed = time.time()
                await kill(pool, ledger, victim)
                after_kill = await settle()
                await flow()
                stop.set()
            await wait_finished(natrio_connection, watch, "keyed", record.total, poll=POLL)
            elapsed = trio.current_time() - began
            left = await harness.settled_pending(
                natrio_connection, [f"keyed~default~p{p}" for p in range(partitions)], poll=POLL
            )
            counted = await harness.outcomes(natrio_connection, "keyed")
            for worker in pool.alive:
                await pool.terminate(worker, STOP_WITHIN)
    executions = ledger.executions
    on_stop = handover(executions, stopped, three, after_stop, record.submitted_at)
    on_kill = handover(executions, crashed, three_again, after_kill, record.submitted_at)
    on_join = [
        latency
        for joined, before, after in joins
        for latency in handover(executions, joined, before, after, record.submitted_at).values()
    ]
    of_leaving = [on_stop[p] for p in three[leaving.worker_id]]
    of_victim = [on_kill[p] for p in three_again[victim.worker_id]]
    overlapping = overlaps(executions, lambda e: e.partition)
    out_of_order = order_violations(executions, record.counts)
    wrong_partition = [e for e in executions if e.partition != partition_of(e.key, partitions)]
    cut = sum(e.cut is not None for e in executions)
    recovery = max([*on_stop.values(), *on_kill.values()])
    result = harness.ScenarioResult.of(
        counted,
        scenario="Partition failover",
        load=(
            f"{record.total} tasks at {rate}/s for {len(keys)} keys in order, "
            f"{partitions} partitions, handlers {handler_ms} ms; members 1, 2, 3, 2, 3, 2"
        ),
        faults=(
            f"SIGTERM one of 3 worker processes; later SIGKILL one of 3 "
            f"(directory TTL {ttl:g} s, handler ack_wait 10 s capped at the TTL)"
        ),
        submitted=record.total,
        recovery_seconds=recovery,
        notes=(
            f"recovery = longest time from a fault to the first task of a moved partition "
            f"started by its new holder, tasks waiting; clean stop: {len(on_stop)} "
            f"partitions moved, the stopped worker's {len(of_leaving)} served again within "
            f"{max(of_leaving):.2f} s, all within {max(on_stop.values()):.2f} s "
            f"(bound {stop_bound:g} s); SIGKILL: {len(on_kill)} moved, the killed "
            f"worker's {len(of_victim)} within {max(of_victim):.2f} s, all within "
            f"{max(on_kill.values()):.2f} s (bound TTL + 2 = {kill_bound:g} s); "
            f"on the 3 joins {len(on_join)} moved, each served by the new holder within "
            f"{max(on_join):.2f} s of its READY (bound {stop_bound:g} s); "
            f"partitions per member once settled {', '.join(states)}; "
            f"{len(executions)} executions, {cut} cut short by the kill, "
            f"{repeats(executions)} run again; {len(out_of_order)} out of order, "
            f"{len(overlapping)} overlapping; {elapsed:.1f} s in all"
        ),
    )
    harness.report(result)
    assert not overlapping, overlapping[:10]
    assert not overlaps(executions, lambda e: e.key)
    assert not out_of_order, out_of_order[:10]
    assert not wrong_partition, wrong_partition[:10]
    assert max(on_stop.values()) <= stop_bound, on_stop
    assert max(on_kill.values()) <= kill_bound, on_kill
    assert max(on_join) <= stop_bound, on_join
    assert result.lost == 0
    assert counted == harness.Outcomes(completed=record.total, duplicates=0, dead=0)
    assert left == harness.NOTHING_LEFT


async def test_singleton_failover(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    """Singleton: no two executions overlap across three processes; SIGTERM the one running
    a task (the next starts elsewhere at once), then SIGKILL the next holder mid-task (its
    task runs elsewhere within ack_wait + 1 s)."""
    rounds = harness.pick(1, 3)
    ack_wait = 2.0
    # Long enough that a kill seen at a task's start lands while it runs.
    handler_ms = 200
    rate = 3.0  # a singleton at 200 ms a task manages about 4.5/s
    dwell = harness.pick(1.0, 3.0)
    options = ("--ack-wait", f"{ack_wait:g}", "--grace", f"{GRACE:g}", "--solo-ms", str(handler_ms))
    ttl = await directory_ttl(natrio_connection)
    stop_bound = 1.0
    kill_bound = ack_wait + 1.0
    client = natrio.Client(natrio_connection)
    ledger = Ledger()
    record = Feed()
    on_stop: list[float] = []
    on_kill: list[float] = []

    def started_elsewhere(since: float, worker: str) -> Execution | None:
        """The first task started after ``since`` by another worker than ``worker``."""
        return next((e for e in ledger.executions if e.start > since and e.worker != worker), None)

    with trio.fail_after(harness.pick(60, 240)):
        async with (
            routing_pool(natrio_server.url, ledger) as pool,
            watch_events(natrio_connection, "solo") as watch,
        ):
            began = trio.current_time()
            await pool.start_all(options, options, options)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        feed,
                        client,
                        "solo",
                        ["solo"],
                        rate,
                        lambda key, seq: str(seq).encode(),
                        record,
                        stop,
                        keyed=False,
                    )
                )
                for round_ in range(rounds):
                    await trio.sleep(dwell)  # the load pattern: tasks flow this long
                    # SIGTERM the process running a task: its handler finishes in the
                    # grace, the next task starts on another at once.
                    now = time.time()
                    holder = await ledger.until(lambda: running(ledger, now))  # noqa: B023
                    stopped = time.time()
                    await pool.terminate(pool.by_id(holder.worker), STOP_WITHIN)
                    taken = await ledger.until(
                        lambda: started_elsewhere(stopped, holder.worker)  # noqa: B023
                    )
                    last_end = max(
                        e.end or 0.0 for e in ledger.executions if e.worker == holder.worker
                    )
                    since = max(stopped, last_end, record.submitted_at[(taken.key, taken.seq)])
                    on_stop.append(taken.start - since)

                    # SIGKILL the next holder while it runs a task: the task comes back
                    # after its ack wait and runs elsewhere.
                    victim = await ledger.until(
                        lambda: running(ledger, taken.start, taken.worker)  # noqa: B023
                    )
                    crashed = time.time()
                    await kill(pool, ledger, pool.by_id(victim.worker))
                    assert victim.end is None, "the task ended before the kill"
                    again = await ledger.until(
                        lambda: started_elsewhere(crashed, victim.worker)  # noqa: B023
                    )
                    since = max(crashed, record.submitted_at[(again.key, again.seq)])
                    on_kill.append(again.start - since)
                    assert (again.key, again.seq) == (victim.key, victim.seq)
                    if round_ + 1 < rounds:
                        await pool.start_all(*[options] * (3 - len(pool.alive)))
                await trio.sleep(dwell)  # the load pattern: tasks flow this long
                stop.set()
            await wait_finished(natrio_connection, watch, "solo", record.total, poll=POLL)
            elapsed = trio.current_time() - began
            left = await harness.settled_pending(natrio_connection, ["solo~default"], poll=POLL)
            counted = await harness.outcomes(natrio_connection, "solo")
            for worker in pool.alive:
                await pool.terminate(worker, STOP_WITHIN)
    executions = ledger.executions
    overlapping = overlaps(executions, lambda e: e.task_type)
    never_returned = [e for e in executions if e.end is None and not e.killed]
    workers = {e.worker for e in executions}
    result = harness.ScenarioResult.of(
        counted,
        scenario="Singleton failover",
        load=(
            f"{record.total} singleton tasks at {rate:g}/s, handlers {handler_ms} ms, "
            f"3 worker processes"
        ),
        faults=(
            f"{rounds} x (SIGTERM the process running a task, then SIGKILL the next holder "
            f"mid-task, start 2 new between rounds); ack_wait {ack_wait:g} s, directory TTL {ttl:g} s"
        ),
        submitted=record.total,
        recovery_seconds=max(on_stop + on_kill),
        notes=(
            "recovery = longest time from a fault (or the stopped holder's last return, "
            "or the task's submit, if later) to the next start on another process; "
            f"SIGTERM: {' / '.join(f'{s:.3f}' for s in on_stop)} s (bound {stop_bound:g} s); "
            f"SIGKILL: {' / '.join(f'{s:.2f}' for s in on_kill)} s (bound ack_wait + 1 = "
            f"{kill_bound:g} s), the killed task run again each time; "
            f"{len(executions)} executions on {len(workers)} processes, {len(overlapping)} "
            f"overlapping; "
            f"{elapsed:.1f} s in all"
        ),
    )
    harness.report(result)
    assert not overlapping, overlapping[:10]
    assert not never_returned, never_returned[:10]
    assert max(on_stop) <= stop_bound, on_stop
    assert max(on_kill) <= kill_bound, on_kill
    assert result.lost == 0
    assert counted == harness.Outcomes(completed=record.total, duplicates=0, dead=0)
    assert left == harness.NOTHING_LEFT
