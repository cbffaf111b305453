"""Shared pieces of the chaos suite: scale, counting outcomes, and reporting one line each.

``NATRIO_CHAOS_SCALE`` is ``short`` (the default: small counts, same assertions, run by
``nox -s tests`` and so by CI) or ``full`` (the published figures, ``nox -s chaos``).
With ``NATRIO_CHAOS_RESULTS`` set, each scenario appends its result as a JSON line there;
``python -m tests.chaos.render`` turns those lines into ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
from typing import TypeVar

import attrs

import natrio
from natrio._jetstream import JetStream

T = TypeVar("T")


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
