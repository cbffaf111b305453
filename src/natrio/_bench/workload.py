"""The work every contestant does: the same task payloads, the same no-op, the same events.

The baselines cannot import natrio's worker, so what makes a fair comparison is written
down here once: the task type, its attrs input and output, how tasks are enqueued, and
the completion event (subject and headers) a worker records for each task.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs

from .. import _wire as wire

TASK_TYPE = "bench"
GROUP = wire.DEFAULT_GROUP
#: The durable consumer every contestant pulls (natrio's own name for it).
CONSUMER = wire.consumer_name(TASK_TYPE, GROUP)
FILTER = wire.task_filter(TASK_TYPE, GROUP)


@attrs.frozen
class Job:
    """A small task input."""

    n: int
    name: str
    size: int


@attrs.frozen
class JobDone:
    """A small task output."""

    n: int
    ok: bool


def run_id(round_: str, n: int) -> str:
    """The run id of the ``n``-th task of one contestant's round (rounds never collide)."""
    return f"{round_}-{n}"


def task_subject(round_: str, n: int) -> str:
    """Where the ``n``-th task of a round is published."""
    return wire.task_subject(TASK_TYPE, GROUP, run_id(round_, n), TASK_TYPE)


def task_payload(n: int) -> bytes:
    """The ``n``-th task's input, as natrio's codec writes a Job."""
    return json.dumps({"n": n, "name": f"job-{n}", "size": 640}, separators=(",", ":")).encode()


def task_headers(round_: str, n: int) -> dict[str, str]:
    """The headers ``Client.submit`` puts on a task (no reply: nobody waits in a drain)."""
    return {
        wire.H_MSG_ID: wire.task_msg_id(TASK_TYPE, run_id(round_, n), TASK_TYPE),
        wire.H_SUBMITTED: repr(time.time()),
    }


#: Makes the ``n``-th task of a round: (subject, payload, headers).
TaskMessage = Callable[[str, int], tuple[str, bytes, dict[str, str]]]


def task_message(round_: str, n: int) -> tuple[str, bytes, dict[str, str]]:
    """The ``n``-th task of a round as ``Client.submit`` publishes it (a ``TaskMessage``)."""
    return task_subject(round_, n), task_payload(n), task_headers(round_, n)


def completion(reply: str, subject: str, worker: str) -> tuple[str, dict[str, str]]:
    """The completed event's subject and headers for a delivered task, as natrio writes them.

    ``reply`` is the delivery's ack subject, ``subject`` the task subject.
    """
    delivered, seq = wire.parse_ack_subject(reply)
    parsed = wire.parse_task_subject(subject)
    assert parsed is not None, subject
    task_type, _group, run, step = parsed
    return wire.event_subject(task_type, run, step, wire.COMPLETED), {
        wire.H_TASK_SEQ: str(seq),
        wire.H_ATTEMPT: str(delivered),
        wire.H_WORKER: worker,
        wire.H_MSG_ID: wire.outcome_msg_id("c", task_type, run, step, seq),
        wire.H_OUTCOME: wire.COMPLETED,
    }


def consumer_config(ack_wait: float = 30.0) -> dict[str, Any]:
    """The consumer every contestant uses: the one a natrio worker creates."""
    return wire.consumer_config(TASK_TYPE, GROUP, ack_wait)


def rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds another process has used (Linux ``/proc``; else None)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # The command name (2nd field) is in parentheses and may hold spaces.
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are the 14th and 15th fields, the 12th and 13th after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_peak_bytes() -> int:
    """The most this process has been resident so far.

    Linux: ``VmHWM`` from ``/proc`` (``ru_maxrss`` survives exec, so a contestant would
    report the bench's own peak); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Meter:
    """Wall and CPU time of a contestant's measured stretch, started when it is made.

    CPU time is the whole process's (every thread, user and system), so a contestant
    that hands work to threads pays for it too.
    """

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def figures(self, tasks: int) -> dict[str, Any]:
        """Tasks, seconds, rate and CPU of the stretch so far (call it once, at its end)."""
        seconds = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        return {
            "tasks": tasks,
            "seconds": seconds,
            "rate": tasks / seconds if seconds > 0 else 0.0,
            "cpu_seconds": cpu,
            "cpu_us_per_task": cpu / tasks * 1e6 if tasks else None,
        }


#: What the line of a contestant's figures on stdout starts with.
EMIT_PREFIX = "NATRIO-BENCH "


def emit(figures: dict[str, Any]) -> None:
    """Hand a contestant's figures to the bench: one JSON line on stdout.

    Every line carries the process's peak RSS so far (``rss_peak``), unless the figures
    bring their own (a contestant whose workers are other processes reports theirs).
    """
    line = json.dumps({"rss_peak": rss_peak_bytes()} | figures)
    sys.stdout.write(EMIT_PREFIX + line + "\n")
    sys.stdout.flush()
