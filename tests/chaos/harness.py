"""Shared pieces of the chaos suite: scale, following and counting outcomes, and reporting
one line each.

``NATRIO_CHAOS_SCALE`` is ``short`` (the default: small counts, same assertions, run by
``nox -s tests`` and so by CI) or ``full`` (the published figures, ``nox -s chaos``).
With ``NATRIO_CHAOS_RESULTS`` set, each scenario appends its result as a JSON line there;
``python -m tests.chaos.render`` turns those lines into ``docs/reliability.md``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import trio

import natrio
from natrio._jetstream import JetStream

T = TypeVar("T")
NOTHING_LEFT = {"ack_pending": 0, "pending": 0}


def full() -> bool:
    """Whether this is the full run."""
    return os.environ.get("NATRIO_CHAOS_SCALE", "short") == "full"


def pick(short: T, full_value: T) -> T:
    """``short`` for the quick run, ``full_value`` for the published one."""
    return full_value if full() else short


@attrs.frozen
class ScenarioResult:
    """One row of docs/reliability.md."""

    scenario: str
    load: str
    faults: str
    submitted: int
    completed: int
    dead_lettered: int
    lost: int
    duplicate_completions: int
    recovery_seconds: float | None = None
    notes: str = ""

    @classmethod
    def of(
        cls,
        counted: Outcomes,
        *,
        scenario: str,
        load: str,
        faults: str,
        submitted: int,
        lost: int | None = None,
        dead_lettered: int | None = None,
        recovery_seconds: float | None = None,
        notes: str = "",
    ) -> ScenarioResult:
        """The row with ``counted``'s completions and duplicates; ``lost`` unless given: the
        submitted tasks with no outcome; ``dead_lettered`` unless given: the dead steps."""
        return cls(
            scenario=scenario,
            load=load,
            faults=faults,
            submitted=submitted,
            completed=counted.completed,
            dead_lettered=counted.dead if dead_lettered is None else dead_lettered,
            lost=submitted - counted.completed - counted.dead if lost is None else lost,
            duplicate_completions=counted.duplicates,
            recovery_seconds=recovery_seconds,
            notes=notes,
        )


def report(result: ScenarioResult) -> None:
    """Print the scenario's summary line and, if asked, append it to the results file."""
    recovery = "-" if result.recovery_seconds is None else f"{result.recovery_seconds:.2f}s"
    print(
        f"\n[chaos] {result.scenario}: submitted={result.submitted} completed={result.completed} "
        f"dead={result.dead_lettered} lost={result.lost} duplicates={result.duplicate_completions} "
        f"recovery={recovery} {result.notes}".rstrip()
    )
    path = os.environ.get("NATRIO_CHAOS_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(
                json.dumps(attrs.asdict(result) | {"scale": "full" if full() else "short"}) + "\n"
            )


@attrs.frozen
class Outcomes:
    """What the events stream says happened to one task type's steps."""

    completed: int  # steps with at least one completion event
    duplicates: int  # completion events beyond the first, summed over steps
    dead: int  # steps with a dead event


async def outcomes(nc: natrio.Connection, task_type: str) -> Outcomes:
    """Count completion and dead events per step for ``task_type``."""
    js = JetStream(nc, timeout=30.0)

    async def per_subject(kind: str) -> dict[str, int]:
        return await js.subjects("NATRIO_EVENTS", f"natrio.event.{task_type}.*.*.{kind}")

    completed = await per_subject("completed")
    dead = await per_subject("dead")
    return Outcomes(
        completed=len(completed),
        duplicates=sum(completed.values()) - len(completed),
        dead=len(dead),
    )


async def pending(nc: natrio.Connection, task_type: str, group: str = "default") -> dict[str, int]:
    """What is left on one task type's consumer: ack pending and not yet delivered."""
    info = await JetStream(nc, timeout=30.0).consumer_info("NATRIO_TASKS", f"{task_type}~{group}")
    return {"ack_pending": info["num_ack_pending"], "pending": info["num_pending"]}


async def settled_pending(
    nc: natrio.Connection, consumers: Iterable[str], within: float = 20.0, poll: float = 0.5
) -> dict[str, int]:
    """What is left on ``consumers`` (ack pending and not yet delivered, summed over them)
    once nothing is, or as it is after ``within`` s.

    An ack travels after its completion event, and a task whose worker died between the
    two is acked only when redelivered (after ack_wait); the consumer state is observable
    only by asking the server.
    """
    js = JetStream(nc, timeout=30.0)

    async def left() -> dict[str, int]:
        total = dict.fromkeys(NOTHING_LEFT, 0)
        for name in consumers:
            info = await js.consumer_info("NATRIO_TASKS", name)
            total["ack_pending"] += info["num_ack_pending"]
            total["pending"] += info["num_pending"]
        return total

    with trio.move_on_after(within):
        # Polled (ASYNC110): the consumer state is only observable by asking the server.
        while (now := await left()) != NOTHING_LEFT:  # noqa: ASYNC110
            await trio.sleep(poll)
        return now
    return await left()


class EventWatch:
    """Follows ``natrio.event.<type>.*.*.*`` on core NATS: unique runs completed or dead,
    runs started again on a redelivery, and the arrival time of every completion event
    (for the longest gap in processing).

    Core messages published while this connection is reconnecting are not seen here;
    :func:`wait_finished` therefore confirms from the events stream.
    """

    def __init__(self, sub: natrio.Subscription) -> None:
        self.sub = sub
        self.completed: set[str] = set()
        self.dead: set[str] = set()
        self.rerun: set[str] = set()  # runs started on a later delivery (after a crash)
        self.first_worker: dict[str, str] = {}  # the worker that started a run's first attempt
        self.completion_times: list[float] = []
        self.completed_at: dict[str, float] = {}
        self._waiters: list[tuple[int, trio.Event]] = []

    @property
    def finished(self) -> int:
        return len(self.completed | self.dead)

    async def run(self) -> None:
        async for msg in self.sub:
            tokens = msg.subject.split(".")
            run_id, kind = tokens[3], tokens[-1]
            if kind == "completed":
                now = trio.current_time()
                self.completed.add(run_id)
                self.completed_at.setdefault(run_id, now)
                self.completion_times.append(now)
            elif kind == "dead":
                self.dead.add(run_id)
            else:
                if kind == "started":
                    if msg.header("Natrio-Attempt", "1") == "1":
                        self.first_worker[run_id] = msg.header("Natrio-Worker") or ""
                    else:
                        self.rerun.add(run_id)
                continue
            finished = self.finished
            for count, event in self._waiters:
                if finished >= count:
                    event.set()

    async def reached(self, count: int) -> None:
        """Return once ``count`` runs have finished (completed or dead)."""
        if self.finished >= count:
            return
        event = trio.Event()
        self._waiters.append((count, event))
        await event.wait()

    def longest_gap(self, since: float | None = None) -> float:
        """The longest time between consecutive completion events (and from ``since`` to the first)."""
        times = ([since] if since is not None else []) + self.completion_times
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@asynccontextmanager
async def watch_events(nc: natrio.Connection, task_type: str) -> AsyncIterator[EventWatch]:
    """An :class:`EventWatch` of ``task_type``, following until the block ends."""
    sub = await nc.subscribe(f"natrio.event.{task_type}.*.*.*")
    watch = EventWatch(sub)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        try:
            yield watch
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await sub.unsubscribe()


async def wait_finished(
    nc: natrio.Connection, watch: EventWatch, task_type: str, total: int, poll: float = 0.5
) -> Outcomes:
    """Wait until the events stream holds an outcome (completed or dead) for ``total`` steps."""
    while True:
        with trio.move_on_after(2.0):
            await watch.reached(total)
        counted = await outcomes(nc, task_type)
        if counted.completed + counted.dead >= total:
            return counted
        # Seen on core NATS a moment before it is stored, or missed while reconnecting:
        # only the stream can tell, so ask it again.
        await trio.sleep(poll)
