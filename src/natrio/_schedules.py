"""Delayed and recurring tasks on JetStream message schedules, free of I/O.

A **delayed task** is a one-shot schedule: a message on
``natrio.delayed.<task_type>.<group>.<run_id>.<step_id>`` in the task stream with
``Nats-Schedule: @at <time>`` and ``Nats-Schedule-Target: <task subject>``, carrying the
task's payload and headers (and its ``Nats-Msg-Id``, so that submits dedupe as usual).
At that time the server stores a copy on the target, less ``Nats-Msg-Id`` and the
``Nats-Schedule*`` headers, plus ``Nats-Scheduler`` (the schedule's subject) and
``Nats-Schedule-Next: purge``, and removes the schedule.

A **recurring schedule** is ``natrio.schedule.<task_type>.<group>.<schedule_id>`` with an
``@every <n>s`` or 6-field cron ``Nats-Schedule`` (and ``Nats-Schedule-Time-Zone`` for
cron), targeting ``natrio.task.<task_type>.<group>.<schedule_id>.<step_id>``; every
firing is stored there with ``Nats-Scheduler`` and ``Nats-Schedule-Next: <next time>``.
The firings share one subject, so the wire edge gives each its own run id,
:func:`firing_run_id` of the schedule id and the firing's stream timestamp (read from
its ack subject): ``<schedule_id>=<nanoseconds since the epoch>``. A redelivery of a
firing keeps its timestamp, so its run id; two firings never share one.

Schedule subjects are in the task stream (a schedule must be in the stream of its
target) but outside every task consumer's filter (``natrio.task.<type>.<group>.>``): a
consumer that acked a schedule message would delete the schedule.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Final

import attrs

from . import _wire as wire
from ._errors import ConfigurationError, NatrioError

#: The oldest nats-server with message schedules.
MIN_SERVER: Final = (2, 12)
#: The longest schedule id: ``=`` and a timestamp of up to 20 digits must still fit in a
#: run id (128 characters).
MAX_SCHEDULE_ID: Final = 100
#: The longest interval of ``every`` (100 years), well inside what the server's duration
#: parser takes.
MAX_EVERY: Final = 100 * 365 * 86400

#: ``Nats-Schedule-Next`` on a one-shot schedule's firing.
NEXT_PURGE: Final = "purge"

#: Cron shorthands the server knows, each the 6-field expression it stands for.
CRON_SHORTHANDS: Final = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}

# (lowest, highest, names) of the six cron fields, as nats-server reads them.
_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
    )
}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_CRON_FIELDS: Final[tuple[tuple[str, int, int, Mapping[str, int]], ...]] = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
# One range of a cron field: ``*`` or ``?``, a value, or ``a-b``; optionally ``/step``.
_CRON_RANGE = re.compile(r"(\*|\?|[0-9A-Za-z]{1,3}(?:-[0-9A-Za-z]{1,3})?)(?:/([0-9]{1,2}))?")
_EVERY = re.compile(r"@every ([1-9][0-9]{0,9})s")
# IANA names: ``Area/Location`` of letters, digits, ``_ + -``; no empty, ``.`` or ``..``
# component, so nothing that could name a file outside the zone database.
_TIME_ZONE = re.compile(r"[A-Za-z0-9_+-]{1,32}(?:/[A-Za-z0-9_+-]{1,32}){0,2}")
#: ``Nats-Schedule-Next`` on a recurring firing: RFC 3339 with up to 9 fraction digits.
NEXT_TIME: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_TIMESTAMP = re.compile(r"[1-9][0-9]{0,19}")


@attrs.frozen
class Schedule:
    """A recurring schedule, as :meth:`natrio.Client.schedules` lists it.

    ``spec`` is what the server fires by: ``@every <n>s``, a 6-field cron expression
    (seconds first) or a cron shorthand such as ``@hourly``; ``time_zone`` is the IANA
    name cron is read in (None: UTC). Each firing submits ``task_type`` in ``group`` with
    step id ``step_id`` and a run id of its own, ``<schedule_id>=<the firing's stream
    timestamp in ns>`` (see docs/schedules.md).
    """

    schedule_id: str
    task_type: str
    group: str
    step_id: str
    spec: str
    time_zone: str | None = None


def check_schedule_id(value: object) -> str:
    """``value`` if it is a valid schedule id (a run id of at most 100 characters)."""
    checked = wire.check_id("schedule id", value)
    if len(checked) > MAX_SCHEDULE_ID:
        raise ConfigurationError(
            f"invalid schedule id {checked[:40]!r}...: at most {MAX_SCHEDULE_ID} characters "
            "(a firing's run id adds '=' and a timestamp)"
        )
    return checked


def supports_schedules(server_version: str) -> bool:
    """Whether a nats-server of this version has message schedules (2.12 or later)."""
    numbers = []
    for part in server_version.lstrip("v").split("-")[0].split(".")[:2]:
        numbers.append(int(part) if part.isdigit() else 0)
    return tuple(numbers) >= MIN_SERVER


def require_schedules(server_version: str) -> None:
    """Raise NatrioError, naming the version needed, unless a nats-server of this version
    has message schedules."""
    if not supports_schedules(server_version):
        raise NatrioError(
            "delayed and recurring tasks are JetStream message schedules, which need "
            f"nats-server 2.12 or later; this server is {server_version}"
        )


def every_spec(every: object) -> str:
    """The ``Nats-Schedule`` of an interval: a timedelta or seconds, whole and >= 1."""
    if isinstance(every, timedelta):
        if every.microseconds:
            raise ConfigurationError(f"every must be whole seconds, got {every!r}")
        seconds: float = every.total_seconds()
    elif isinstance(every, int | float) and not isinstance(every, bool):
        seconds = every if isinstance(every, float) else min(every, MAX_EVERY + 1)
    else:
        raise ConfigurationError(f"every must be a timedelta or seconds, got {every!r}")
    if not math.isfinite(seconds) or seconds != int(seconds):
        raise ConfigurationError(f"every must be whole seconds, got {every!r}")
    if not 1 <= seconds <= MAX_EVERY:
        raise ConfigurationError(
            f"every must be 1 second to 100 years (the server fires at most once a second), "
            f"got {every!r}"
        )
    return f"@every {int(seconds)}s"


def cron_spec(cron: object) -> str:
    """The ``Nats-Schedule`` of a cron expression: 6 fields (second minute hour
    day-of-month month day-of-week) or a shorthand (``@hourly``, ``@daily``, ...), checked
    as nats-server reads them; returned with single spaces between the fields."""
    if not isinstance(cron, str) or len(cron) > 256:
        raise ConfigurationError(f"cron must be a str of at most 256 characters, got {cron!r}")
    if cron in CRON_SHORTHANDS:
        return cron
    fields = cron.split(" ")
    fields = [field for field in fields if field]
    if not cron.isascii() or any(c in cron for c in "\t\r\n\v\f"):
        raise ConfigurationError(f"cron {cron[:80]!r}: use ASCII fields separated by spaces")
    if len(fields) != 6:
        raise ConfigurationError(
            f"cron {cron[:80]!r} has {len(fields)} fields; natrio takes 6, seconds first "
            f"('second minute hour day-of-month month day-of-week', e.g. '0 */5 * * * *'), "
            f"or one of {', '.join(CRON_SHORTHANDS)}"
        )
    for field, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in field.split(","):
            problem = _range_problem(part, low, high, names)
            if problem:
                raise ConfigurationError(
                    f"cron {cron[:80]!r}: the {name} field {field!r}: {problem}"
                )
    return " ".join(fields)


def _range_problem(part: str, low: int, high: int, names: Mapping[str, int]) -> str:
    match = _CRON_RANGE.fullmatch(part)
    if match is None:
        return f"{part!r} is not '*', 'a', 'a-b' or one of those with '/step'"
    span, step = match[1], match[2]
    if step is not None and int(step) == 0:
        return "a step must be at least 1"
    if span in ("*", "?"):
        return ""
    bounds = []
    for text in span.split("-"):
        if text.isdigit():
            value = int(text)
        elif text.lower() in names:
            value = names[text.lower()]
        else:
            return f"{text!r} is not a number{' or a name' if names else ''}"
        if not low <= value <= high:
            return f"{value} is outside {low}-{high}"
        bounds.append(value)
    if len(bounds) == 2 and bounds[0] > bounds[1]:
        return f"the range {span!r} runs backwards"
    return ""


def check_time_zone(time_zone: object) -> str:
    """``time_zone`` if it is an IANA time zone name Python knows, else raise."""
    if not isinstance(time_zone, str) or not _TIME_ZONE.fullmatch(time_zone):
        raise ConfigurationError(
            f"invalid time zone {time_zone!r}: give an IANA name such as 'Europe/Paris'"
        )
    try:
        zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigurationError(f"unknown time zone {time_zone!r}") from None
    return time_zone


def recurring_spec(
    every: object = None, cron: object = None, time_zone: object = None
) -> tuple[str, str | None]:
    """The ``Nats-Schedule`` and time zone of a recurring schedule, checked."""
    if (every is None) == (cron is None):
        raise ConfigurationError("give every or cron (one of them)")
    if every is not None:
        if time_zone is not None:
            raise ConfigurationError("time_zone applies to cron only (every counts seconds)")
        return every_spec(every), None
    return cron_spec(cron), None if time_zone is None else check_time_zone(time_zone)


def start_time(start_at: object, delay: object, now: float) -> float | None:
    """The Unix time a task submitted at ``now`` with ``start_at`` or ``delay`` runs at,
    or None for neither (it runs as soon as a worker takes it)."""
    if start_at is not None and delay is not None:
        raise ConfigurationError("give start_at or delay, not both")
    if start_at is not None:
        if not isinstance(start_at, datetime):
            raise ConfigurationError(f"start_at must be a datetime, got {start_at!r}")
        if start_at.tzinfo is None or start_at.utcoffset() is None:
            raise ConfigurationError("start_at must be timezone-aware (naive times are ambiguous)")
        try:
            when = start_at.timestamp()
        except (OverflowError, ValueError) as exc:
            raise ConfigurationError(f"start_at {start_at!r} is out of range: {exc}") from None
    elif delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ConfigurationError(
                f"delay must be a finite number of seconds >= 0 or a timedelta, got {delay!r}"
            )
        try:
            when = now + float(seconds)
        except OverflowError:  # an int beyond any float
            raise ConfigurationError(f"delay {delay!r} is out of range") from None
        if not math.isfinite(when):
            raise ConfigurationError(
                f"delay must be a finite number of seconds >= 0 or a timedelta, got {delay!r}"
            )
    else:
        return None
    at_spec(when)  # within the years an RFC 3339 time can name
    return when


def at_spec(when: float) -> str:
    """The ``Nats-Schedule`` of a one-shot schedule at Unix time ``when`` (RFC 3339, UTC)."""
    try:
        moment = datetime.fromtimestamp(when, UTC)
    except (OverflowError, OSError, ValueError):
        raise ConfigurationError(f"the start time {when!r} is out of range") from None
    if not 1 <= moment.year <= 9999:
        raise ConfigurationError(f"the start time {when!r} is out of range")
    return f"@at {moment.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


def delayed_headers(when: float, target: str) -> dict[str, str]:
    """The schedule headers of a task to be stored on ``target`` at Unix time ``when``."""
    return {wire.H_SCHEDULE: at_spec(when), wire.H_SCHEDULE_TARGET: target}


def recurring_headers(spec: str, time_zone: str | None, target: str) -> dict[str, str]:
    """The schedule headers of a recurring schedule firing on ``target``."""
    headers = {wire.H_SCHEDULE: spec, wire.H_SCHEDULE_TARGET: target}
    if time_zone is not None:
        headers[wire.H_SCHEDULE_TIME_ZONE] = time_zone
    return headers


def firing_run_id(schedule_id: str, timestamp_ns: int) -> str:
    """The run id of one firing of schedule ``schedule_id``: ``<schedule_id>=<timestamp>``,
    the firing's stream timestamp (or a trigger's time) in nanoseconds since the epoch."""
    return f"{schedule_id}={timestamp_ns}"


def parse_firing_run_id(run_id: str) -> tuple[str, int] | None:
    """(schedule id, timestamp in ns) of a firing's run id, or None if it is not one."""
    schedule_id, sep, stamp = run_id.rpartition("=")
    if not sep or not _TIMESTAMP.fullmatch(stamp):
        return None
    try:
        check_schedule_id(schedule_id)
    except ConfigurationError:
        return None
    return schedule_id, int(stamp)


def valid_timestamp(token: str) -> bool:
    """Whether ``token`` (from an ack subject) is a stream timestamp natrio takes."""
    return _TIMESTAMP.fullmatch(token) is not None


def valid_schedule_subject(subject: str) -> bool:
    """Whether ``subject`` is ``natrio.schedule.<task_type>.<group>.<schedule_id>`` of
    valid names (any client may publish other subjects under ``natrio.schedule.>``)."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != [wire.PREFIX, "schedule"]:
        return False
    try:
        wire.check_name("task type", parts[2])
        wire.check_name("group", parts[3])
        check_schedule_id(parts[4])
    except ConfigurationError:
        return False
    return True


def read_schedule(subject: str, headers: Mapping[str, str]) -> Schedule | None:
    """The schedule a message on a schedule subject holds, or None when it is not one
    natrio made (any client may publish there): the subject, spec, time zone and target
    must all be of the shapes :meth:`natrio.Client.schedule` writes."""
    if not valid_schedule_subject(subject):
        return None
    _, _, task_type, group, schedule_id = subject.split(".")
    try:
        spec = headers.get(wire.H_SCHEDULE) or ""
        zone = headers.get(wire.H_SCHEDULE_TIME_ZONE)
        if _EVERY.fullmatch(spec):
            if zone is not None:
                return None
            spec = every_spec(int(spec[7:-1]))
        else:
            spec = cron_spec(spec)
            zone = None if zone is None else check_time_zone(zone)
        prefix = wire.task_subject(task_type, group, schedule_id, "")
        target = headers.get(wire.H_SCHEDULE_TARGET) or ""
        if not target.startswith(prefix):
            return None
        step_id = wire.check_id("step id", target[len(prefix) :])
    except ConfigurationError:
        return None
    return Schedule(schedule_id, task_type, group, step_id, spec, zone)


def task_schedules_config() -> dict[str, object]:
    """What the task stream's config needs for schedules (nats-server 2.12 or later)."""
    return {
        # Schedules must be in the stream of the task subjects they target.
        "subjects": [
            f"{wire.PREFIX}.task.>",
            f"{wire.PREFIX}.delayed.>",
            f"{wire.PREFIX}.schedule.>",
        ],
        "allow_msg_schedules": True,
        # The server turns it on with schedules; said here so an update keeps it.
        "allow_rollup_hdrs": True,
        # Schedules are read by a direct get: one batch for all, and permissions that can
        # name the schedule subjects.
        "allow_direct": True,
    }


#: JetStream's error codes for a refused schedule: disabled on the stream, a pattern or
#: time zone the server does not take.
SCHEDULES_DISABLED: Final = 10188
PATTERN_INVALID: Final = 10189
TIME_ZONE_INVALID: Final = 10223


def _own_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # What a schedule message says, less what the server adds when it stores or serves it
    # (Nats-Rollup, Nats-Sequence, ...).
    kept = {wire.H_SCHEDULE, wire.H_SCHEDULE_TARGET, wire.H_SCHEDULE_TIME_ZONE}
    return {k: v for k, v in headers.items() if k in kept or not k.lower().startswith("nats-")}


def same_schedule(
    stored_data: bytes, stored_headers: Mapping[str, str], data: bytes, headers: Mapping[str, str]
) -> bool:
    """Whether a stored schedule message already says what ``data`` and ``headers`` would:
    then it is left alone (storing it again would restart an ``every`` interval)."""
    return stored_data == data and _own_headers(stored_headers) == _own_headers(headers)


def trigger_headers(stored: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The caller's own headers of a stored schedule and its ``Natrio-Retry``, for a task
    run now: JetStream's (``Nats-*``) and natrio's other headers stay behind."""
    own = {k: v for k, v in stored.items() if not k.lower().startswith(("nats-", "natrio-"))}
    return own, stored.get(wire.H_RETRY)
