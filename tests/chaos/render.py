"""Turn the chaos suite's JSON lines into docs/reliability.md.

Usage: python -m tests.chaos.render RESULTS.jsonl OUTPUT.md "COMMAND THAT PRODUCED THEM"
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime

import natrio

HEADER = """# Reliability

natrio promises that a task is never lost, that each step yields exactly one completion
event, and that a worker never falls over on bad input. The chaos suite (`tests/chaos/`)
checks those promises against real `nats-server` processes with real faults (signals to
real processes), counting everything. Every row below must show 0 lost tasks and 0
duplicate completion events.

CI runs the same scenarios at a smaller scale (`nox -s tests`); this page holds the
figures of a full run.
"""


def main(results: str, output: str, command: str) -> None:
    """Write ``output`` from the JSON lines in ``results``."""
    with open(results, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    out = [HEADER]
    out.append(f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d} ")
    out.append(
        f"(natrio {natrio.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, 2 cores).\n"
    )
    out.append(
        "| scenario | load | faults injected | submitted | completed | dead-lettered | lost "
        "| duplicate completions | time to recover | notes |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        recovery = "-" if row["recovery_seconds"] is None else f"{row['recovery_seconds']:.2f} s"
        out.append(
            f"| {row['scenario']} | {row['load']} | {row['faults']} | {row['submitted']} "
            f"| {row['completed']} | {row['dead_lettered']} | {row['lost']} "
            f"| {row['duplicate_completions']} | {recovery} | {row['notes']} |"
        )
    with open(output, "w", encoding="utf-8") as doc:
        doc.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
