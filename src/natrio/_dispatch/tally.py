"""Per task type counters and handler times, kept by the dispatcher; free of I/O.

The runners only add to a :class:`Tally` (an increment per outcome, one float appended to a
bounded deque per handler call); percentiles are worked out when someone asks, from the
last :data:`WINDOW` handler times of the type.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence

import attrs

#: How many recent handler calls of a task type its percentiles are taken over.
WINDOW = 1024
#: Seconds a task type's handler-time percentiles are kept before they are worked out again.
PERCENTILES_EVERY = 0.5


class Tally:
    """What one worker's executions of one task type came to so far (mutable)."""

    __slots__ = (
        "_percentiles",
        "_percentiles_at",
        "dead",
        "durations",
        "failed",
        "retried",
        "started",
        "succeeded",
    )

    def __init__(self) -> None:
        self.started = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.dead = 0
        #: Seconds each of the last WINDOW handler calls took.
        self.durations: deque[float] = deque(maxlen=WINDOW)
        self._percentiles: tuple[float | None, ...] = (None, None, None)
        self._percentiles_at = -math.inf

    def handler_percentiles(self, now: float) -> tuple[float | None, ...]:
        """p50, p90 and p99 of :attr:`durations`, worked out again at most every
        :data:`PERCENTILES_EVERY` seconds (``now`` on a monotonic clock): a caller
        polling the statistics many times a second must not pay a sort each time."""
        if now - self._percentiles_at >= PERCENTILES_EVERY or self._percentiles[0] is None:
            self._percentiles = percentiles(self.durations, (50, 90, 99))
            self._percentiles_at = now
        return self._percentiles


def percentiles(samples: Iterable[float], points: Sequence[float]) -> tuple[float | None, ...]:
    """The nearest-rank percentiles ``points`` (0-100) of ``samples``; None without samples.

    Nearest rank: the smallest sample with at least p % of the samples at or below it,
    so every answer is a time that was measured.
    """
    ordered = sorted(samples)
    if not ordered:
        return tuple(None for _ in points)
    n = len(ordered)
    return tuple(ordered[min(max(math.ceil(p / 100 * n), 1), n) - 1] for p in points)


@attrs.frozen
class TaskTypeStatistics:
    """A worker's executions of one task type, since it started.

    ``started``: handler calls begun; ``succeeded``: executions recorded as completed (or,
    in an agent loop, continued) and acknowledged; ``failed``: failed attempts, whether
    retried or dead-lettered; ``retried``: failed attempts that will be retried; ``dead``:
    tasks dead-lettered (malformed messages, exhausted attempts and passed deadlines
    included, which start no handler); ``in_flight``: executions under way now.
    ``handler_p50``, ``handler_p90`` and ``handler_p99`` are the nearest-rank
    percentiles, in seconds, of the wall-clock time of the last ``samples`` handler calls
    (at most 1024; worked out at most twice a second, so they may lag the newest calls
    by up to half a second), None before the first. A call is timed however it ended (returned,
    raised, paused or cancelled), through the middleware chain; recording the outcome
    after it returns is not part of it (an outcome the handler records itself, with
    ``ctx.complete`` say, is).
    """

    task_type: str
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    in_flight: int = 0
    samples: int = 0
    handler_p50: float | None = None
    handler_p90: float | None = None
    handler_p99: float | None = None

    @classmethod
    def of(cls, task_type: str, tally: Tally | None, in_flight: int = 0) -> TaskTypeStatistics:
        """A snapshot of ``tally`` (None: nothing happened yet)."""
        if tally is None:
            return cls(task_type, in_flight=in_flight)
        p50, p90, p99 = tally.handler_percentiles(time.monotonic())
        return cls(
            task_type,
            started=tally.started,
            succeeded=tally.succeeded,
            failed=tally.failed,
            retried=tally.retried,
            dead=tally.dead,
            in_flight=in_flight,
            samples=len(tally.durations),
            handler_p50=p50,
            handler_p90=p90,
            handler_p99=p99,
        )
