"""What a deployment is doing, read from the server: per task type and group, the tasks
waiting, in flight and dead-lettered; per task type, the outcomes of the last minute.

Everything comes from JetStream's own bookkeeping, with no worker asked: the task
consumers' state (``CONSUMER.LIST``), the dead-letter stream's subject counts, and for
the rates one short-lived consumer per task type and kind on the events stream, started
at the beginning of the window, whose ``num_pending`` is the number of events of that
kind stored since (the server counts them from its subject index; nothing is delivered).
The window is measured on the server's clock (the ``ts`` of its stream info), so a
client whose clock is off still counts the right minute.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import trio

from . import _wire as wire
from ._errors import ConfigurationError, NatrioError
from ._history import stream_time
from ._jetstream import API, JetStream, short_lived_consumer
from ._util import single_error

#: The event kinds counted for the rates.
RATE_KINDS = (wire.COMPLETED, wire.FAILED, wire.DEAD)

# Counting consumers created at once.
_PARALLEL = 16


@attrs.frozen
class QueueStatistics:
    """The tasks of one task type in one group, as the server sees them now.

    ``pending``: stored and not yet delivered to any worker (its consumers' ``num_pending``,
    partitions and claims included); ``in_flight``: delivered and not yet acknowledged
    (``num_ack_pending``: running, queued in a worker, or waiting out a retry delay
    after a NAK); ``redelivered``: of those, the ones delivered more than once;
    ``dead_letters``: entries in ``NATRIO_DLQ``; ``consumers``: the durable consumers
    serving it (one, plus one per partition and per claim).
    """

    task_type: str
    group: str
    pending: int = 0
    in_flight: int = 0
    redelivered: int = 0
    dead_letters: int = 0
    consumers: int = 0


@attrs.frozen
class EventRates:
    """How many events of each outcome one task type had in the overview's window:
    ``completed`` steps (agent-loop iterations that continued are not counted),
    ``failed`` attempts that will be retried, and ``dead`` (dead-lettered) steps."""

    task_type: str
    completed: int = 0
    failed: int = 0
    dead: int = 0


@attrs.frozen
class Overview:
    """A deployment at one moment (see :meth:`natrio.Client.overview`).

    ``time`` is the server's clock when it was read; the rates count the events stored
    in the ``window`` seconds before it (:meth:`per_minute` scales them).
    ``stored_tasks`` is every task in ``NATRIO_TASKS`` (schedules and delayed tasks not
    yet due are not counted); ``unserved`` those of them no
    consumer matches (a task type or group no worker has served yet).
    """

    time: datetime
    window: float
    queues: tuple[QueueStatistics, ...]
    rates: tuple[EventRates, ...]
    stored_tasks: int = 0
    unserved: int = 0

    def per_minute(self, count: int) -> float:
        """``count`` events in the window as events per minute."""
        return count * 60.0 / self.window

    def to_dict(self) -> dict[str, Any]:
        """The overview as JSON-ready data (rates as counts in the window and per minute)."""
        return {
            "time": self.time.isoformat(),
            "window": self.window,
            "stored_tasks": self.stored_tasks,
            "unserved": self.unserved,
            "queues": [attrs.asdict(queue) for queue in self.queues],
            "rates": [
                attrs.asdict(rates)
                | {
                    f"{kind}_per_minute": round(self.per_minute(getattr(rates, kind)), 3)
                    for kind in RATE_KINDS
                }
                for rates in self.rates
            ],
        }


def parse_consumer(info: Mapping[str, Any]) -> tuple[str, str] | None:
    """(task type, group) of a task consumer's info, or None for a consumer that is not
    one of natrio's (its name and filter must be ``<type>~<group>[~<placement>]`` and the
    filter natrio gives that name)."""
    name = info.get("name")
    config = info.get("config")
    if not isinstance(name, str) or not isinstance(config, Mapping):
        return None
    parts = name.split("~")
    if len(parts) not in (2, 3) or not all(wire.valid_name(part) for part in parts[:2]):
        return None
    placement = parts[2] if len(parts) == 3 else None
    # A placement is p<k>, t<claim> or s<claim>, its tail a name.
    if placement is not None and not (
        placement[:1] in ("p", "t", "s") and wire.valid_name(placement[1:])
    ):
        return None
    if config.get("filter_subject") != wire.task_filter(parts[0], parts[1], placement):
        return None
    return parts[0], parts[1]


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def dead_letter_counts(subjects: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """Dead-letter entries by (task type, group), from the DLQ's subject counts; subjects
    without natrio's layout (``natrio.dead.<type>.<group>.<run>.<step>``) are left out."""
    counts: dict[tuple[str, str], int] = {}
    for subject, count in subjects.items():
        parts = subject.split(".")
        if (
            len(parts) != 6
            or parts[0] != wire.PREFIX
            or parts[1] != "dead"
            or not wire.valid_name(parts[2])
            or not wire.valid_name(parts[3])
        ):
            continue
        key = (parts[2], parts[3])
        counts[key] = counts.get(key, 0) + _count(count)
    return counts


def queue_statistics(
    consumers: Iterable[Mapping[str, Any]], dead_letters: Mapping[tuple[str, str], int]
) -> list[QueueStatistics]:
    """One row per (task type, group) with a consumer or a dead letter, sorted."""
    rows: dict[tuple[str, str], QueueStatistics] = {}
    for info in consumers:
        key = parse_consumer(info)
        if key is None:
            continue
        row = rows.get(key) or QueueStatistics(*key)
        rows[key] = attrs.evolve(
            row,
            pending=row.pending + _count(info.get("num_pending")),
            in_flight=row.in_flight + _count(info.get("num_ack_pending")),
            redelivered=row.redelivered + _count(info.get("num_redelivered")),
            consumers=row.consumers + 1,
        )
    for key, count in dead_letters.items():
        row = rows.get(key) or QueueStatistics(*key)
        rows[key] = attrs.evolve(row, dead_letters=count)
    return [rows[key] for key in sorted(rows)]


def rate_filter(task_type: str, kind: str) -> str:
    """The events-stream filter of one task type's events of one kind."""
    return f"{wire.PREFIX}.event.{task_type}.*.*.{kind}"


async def count_since(js: JetStream, subjects: str, start: datetime) -> int:
    """How many messages matching ``subjects`` the events stream stored since ``start``.

    A consumer that starts there is made and dropped at once; its ``num_pending`` is the
    count (no message is delivered). It lives in memory and goes by itself 10 s after,
    should the drop be lost.
    """
    name = f"natrio_count_{secrets.token_hex(6)}"
    config = short_lived_consumer(
        name,
        subjects,
        deliver_policy="by_start_time",
        opt_start_time=start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    )
    info = await js.api(
        f"CONSUMER.CREATE.{wire.EVENT_STREAM}.{name}.{subjects}",
        {"stream_name": wire.EVENT_STREAM, "config": config},
    )
    with suppress(NatrioError):  # not sent: it expires by itself
        js.conn.request_nowait(
            f"{API}.CONSUMER.DELETE.{wire.EVENT_STREAM}.{name}",
            b"",
            timeout=js.timeout,
            on_reply=lambda msg, error: None,
        )
    return _count(info.get("num_pending"))


async def read_overview(js: JetStream, *, window: float = 60.0) -> Overview:
    """Read the deployment's queues, dead letters and the rates of the last ``window`` s."""
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise ConfigurationError(f"window must be a number of seconds, got {window!r}")
    if not (math.isfinite(window) and window > 0):
        raise ConfigurationError(f"window must be > 0 seconds, got {window!r}")
    events = await js.stream_info(wire.EVENT_STREAM)
    now = stream_time(events.get("ts") if isinstance(events.get("ts"), str) else None)
    if now is None:
        now = datetime.now(UTC)  # a server too old to say its time: ours will do
    tasks = await js.stream_info(wire.TASK_STREAM)
    # Schedules share the task stream (outside every consumer's filter): not tasks. Each
    # has a subject of its own holding one message, so counting subjects counts them.
    scheduled = 0
    for kind in ("schedule", "delayed"):
        scheduled += await js.subject_count(wire.TASK_STREAM, f"{wire.PREFIX}.{kind}.>")
    stored = max(_count((tasks.get("state") or {}).get("messages")) - scheduled, 0)
    consumers = await js.consumers(wire.TASK_STREAM)
    dead = dead_letter_counts(await js.subjects(wire.DEAD_STREAM, f"{wire.PREFIX}.dead.>"))
    queues = queue_statistics(consumers, dead)
    start = now - timedelta(seconds=window)
    task_types = sorted({queue.task_type for queue in queues})
    counts: dict[tuple[str, str], int] = {}
    limiter = trio.CapacityLimiter(_PARALLEL)

    async def count(task_type: str, kind: str) -> None:
        async with limiter:
            counts[task_type, kind] = await count_since(js, rate_filter(task_type, kind), start)

    with single_error():
        async with trio.open_nursery() as nursery:
            for task_type in task_types:
                for kind in RATE_KINDS:
                    nursery.start_soon(count, task_type, kind)
    rates = tuple(
        EventRates(task_type, *(counts[task_type, kind] for kind in RATE_KINDS))
        for task_type in task_types
    )
    seen = sum(queue.pending + queue.in_flight for queue in queues)
    return Overview(
        time=now,
        window=float(window),
        queues=tuple(queues),
        rates=rates,
        stored_tasks=stored,
        unserved=max(stored - seen, 0),
    )
