"""Provisioning: idempotent creation of the streams and KV buckets natrio uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _wire as wire
from ._errors import ConfigurationError
from ._jetstream import JetStream
from ._objects import object_stream_config
from ._routing.limits import counter_stream_config
from ._routing.partitions import store_partitions
from ._routing.placement import check_partitions
from ._schedules import supports_schedules, task_schedules_config
from ._transport import Connection

_NS = 1_000_000_000


def _seconds(name: str, value: float, *, allow_zero: bool = True) -> int:
    if not (value > 0 or (allow_zero and value == 0)):
        raise ConfigurationError(
            f"provision: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        )
    return int(value * _NS)


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.lstrip("v").split("-")[0].split(".")[:3]:
        numbers.append(int(part) if part.isdigit() else 0)
    return tuple(numbers)


def kv_stream_config(bucket: str, *, ttl: float, replicas: int, storage: str) -> dict[str, Any]:
    """The stream behind a KV bucket, as nats.go and nats-py create it (history 1)."""
    max_age = _seconds("ttl", ttl)
    return {
        "name": f"KV_{bucket}",
        "subjects": [f"$KV.{bucket}.>"],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "max_age": max_age,
        "discard": "new",
        "storage": storage,
        "num_replicas": replicas,
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
        # The duplicate window may not exceed max_age.
        "duplicate_window": min(max_age, 120 * _NS) if max_age else 120 * _NS,
    }


async def provision(
    nc: Connection,
    *,
    replicas: int = 1,
    storage: str = "file",
    duplicate_window: float = 600.0,
    task_max_age: float = 0.0,
    events_max_age: float = 7 * 86400.0,
    dead_letter_max_age: float = 30 * 86400.0,
    worker_ttl: float = 15.0,
    partitions: Mapping[str, int] | None = None,
) -> None:
    """Create or update natrio's streams and KV buckets; safe to call any number of times.

    - ``NATRIO_TASKS`` (``natrio.task.>``): work-queue retention; a task is removed once
      acknowledged. ``duplicate_window`` (seconds) is how long a second submit of the same
      run id and step id is recognised and dropped. ``task_max_age`` 0 keeps tasks until done.
      On nats-server 2.12 or later it also holds the message schedules of delayed and
      recurring tasks (``natrio.delayed.>``, ``natrio.schedule.>``): ``allow_msg_schedules``
      (which brings ``allow_rollup_hdrs`` and cannot be turned off again) and
      ``allow_direct``, set on an existing stream too.
    - ``NATRIO_EVENTS`` (``natrio.event.>``): started, completed, failed, dead, paused and continued events, kept
      ``events_max_age`` seconds; results of finished tasks are read from here.
    - ``NATRIO_DLQ`` (``natrio.dead.>``): dead-letter entries, kept ``dead_letter_max_age``.
    - Object store ``natrio_dead_inputs``: inputs of dead letters too large to sit in
      their entry, kept as long as the entries.
    - KV ``natrio_workers``: the worker directory; an entry expires ``worker_ttl`` seconds
      after its last heartbeat. KV ``natrio_checkpoints``, ``natrio_signals`` and
      ``natrio_groups`` are created too (no expiry), and KV ``natrio_routing``, where
      ``partitions`` (task type to partition count, 1-256) is stored once: a count that
      differs from the stored one raises ConfigurationError.
    - ``NATRIO_COUNTERS`` (``natrio.counter.>``): counters of cluster-wide rate limits
      (a counter stream: nats-server 2.12 or later; skipped on an older server).

    ``replicas`` (1-5) and ``storage`` (``"file"`` or ``"memory"``) apply to all of them.
    """
    if not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise ConfigurationError(f"provision: replicas must be 1-5, got {replicas!r}")
    if storage not in ("file", "memory"):
        raise ConfigurationError(f"provision: storage must be 'file' or 'memory', got {storage!r}")
    if not worker_ttl > 0:
        raise ConfigurationError(f"provision: worker_ttl must be > 0, got {worker_ttl!r}")
    window = _seconds("duplicate_window", duplicate_window, allow_zero=False)
    common = {"storage": storage, "num_replicas": replicas, "discard": "old"}
    js = JetStream(nc)
    await js.ensure_stream(
        {
            "name": wire.TASK_STREAM,
            "subjects": [f"{wire.PREFIX}.task.>"],
            "retention": "workqueue",
            "max_age": _seconds("task_max_age", task_max_age),
            "duplicate_window": window,
            **common,
            **(task_schedules_config() if supports_schedules(nc.server_version) else {}),
        }
    )
    events_age = _seconds("events_max_age", events_max_age)
    await js.ensure_stream(
        {
            "name": wire.EVENT_STREAM,
            "subjects": [f"{wire.PREFIX}.event.>"],
            "retention": "limits",
            "max_age": events_age,
            "duplicate_window": min(window, events_age) if events_age else window,
            "allow_direct": True,
            **common,
        }
    )
    dead_age = _seconds("dead_letter_max_age", dead_letter_max_age)
    await js.ensure_stream(
        {
            "name": wire.DEAD_STREAM,
            "subjects": [f"{wire.PREFIX}.dead.>"],
            "retention": "limits",
            "max_age": dead_age,
            "duplicate_window": min(window, dead_age) if dead_age else window,
            "allow_direct": True,
            **common,
        }
    )
    await js.ensure_stream(
        object_stream_config(
            wire.DEAD_INPUTS_BUCKET, max_age=dead_age, replicas=replicas, storage=storage
        )
    )
    await js.ensure_stream(
        kv_stream_config(wire.WORKERS_BUCKET, ttl=worker_ttl, replicas=replicas, storage=storage)
    )
    for bucket in (
        wire.CHECKPOINTS_BUCKET,
        wire.SIGNALS_BUCKET,
        wire.GROUPS_BUCKET,
        wire.ROUTING_BUCKET,
    ):
        await js.ensure_stream(kv_stream_config(bucket, ttl=0, replicas=replicas, storage=storage))
    if _version(nc.server_version) >= (2, 12):
        await js.ensure_stream(counter_stream_config(replicas=replicas, storage=storage))
    for task_type, count in (partitions or {}).items():
        wire.check_name("task type", task_type)
        await store_partitions(nc, task_type, check_partitions(count, f"partitions[{task_type!r}]"))
