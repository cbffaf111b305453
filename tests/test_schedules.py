"""Delayed and recurring tasks on JetStream message schedules: the pure rules of
natrio._schedules, the wire edge's reading of fired tasks, and real servers firing them."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import natrio
from natrio import Message
from natrio import _schedules as schedules
from natrio import _wire as wire
from natrio._dispatch.edge import ack_timestamp, read_task
from natrio._errors import MalformedTask
from natrio._jetstream import JetStream
from natrio.testing import WorkerFactory

from .helpers import event_counts

ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")
ACK = "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.1700000000123456789.0"
ACK_V2 = "$JS.ACK.hub.ACCHASH.NATRIO_TASKS.t~default.3.42.7.1700000000000000001.0.r4nd"
NEXT = "2026-12-02T13:13:30Z"


# -- specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "spec"),
    [
        (1, "@every 1s"),
        (60.0, "@every 60s"),
        (timedelta(seconds=5), "@every 5s"),
        (timedelta(hours=2), "@every 7200s"),
        (schedules.MAX_EVERY, f"@every {schedules.MAX_EVERY}s"),
    ],
)
def test_intervals(every: float | timedelta, spec: str) -> None:
    assert schedules.every_spec(every) == spec


@pytest.mark.parametrize(
    "every",
    [
        0,
        0.5,
        1.5,
        -1,
        timedelta(milliseconds=1500),
        timedelta(0),
        timedelta(seconds=-5),
        math.nan,
        math.inf,
        True,
        "5",
        "5s",
        None,
        schedules.MAX_EVERY + 1,
        10**30,
    ],
)
def test_bad_intervals(every: object) -> None:
    with pytest.raises(natrio.ConfigurationError, match="every"):
        schedules.every_spec(every)


@pytest.mark.parametrize(
    ("cron", "spec"),
    [
        ("*/2 * * * * *", "*/2 * * * * *"),
        ("0 0 9 * * mon-fri", "0 0 9 * * mon-fri"),
        ("0 30 9 1,15 JAN-jun ?", "0 30 9 1,15 JAN-jun ?"),
        ("0  0   * * * *", "0 0 * * * *"),
        (" 0 0 * * * * ", "0 0 * * * *"),
        ("59 59 23 31 12 6", "59 59 23 31 12 6"),
        ("5/10 0-30/5 * * * sun", "5/10 0-30/5 * * * sun"),
        ("@hourly", "@hourly"),
        ("@daily", "@daily"),
    ],
)
def test_cron_expressions(cron: str, spec: str) -> None:
    assert schedules.cron_spec(cron) == spec


@pytest.mark.parametrize(
    ("cron", "match"),
    [
        ("0 0 * * *", "5 fields; natrio takes 6"),
        ("0 0 0 * * * *", "7 fields"),
        ("", "0 fields"),
        ("60 * * * * *", "second field '60': 60 is outside 0-59"),
        ("* 60 * * * *", "minute field"),
        ("* * 24 * * *", "hour field"),
        ("* * * 0 * *", "day of month field"),
        ("* * * 32 * *", "day of month field"),
        ("* * * * 13 *", "month field"),
        ("* * * * * 7", "day of week field"),
        ("*/0 * * * * *", "a step must be at least 1"),
        ("5-1 * * * * *", "runs backwards"),
        ("*-5 * * * * *", "is not"),
        ("1,,2 * * * * *", "is not"),
        ("1/2/3 * * * * *", "is not"),
        ("x * * * * *", "'x' is not a number"),
        ("* * * * * funday", "is not"),
        ("* * * * * mon-xyz", "'xyz' is not a number or a name"),
        ("* * * * jan-mon *", "'mon' is not a number or a name"),
        ("0\t0 * * * * *", "ASCII fields separated by spaces"),
        ("0 0 * * * *\n", "ASCII fields separated by spaces"),
        ("\u0663 * * * * *", "ASCII"),
        ("@every 5s", "2 fields"),
        ("@reboot", "1 fields"),
        ("* " * 200, "at most 256"),
    ],
)
def test_bad_cron_expressions(cron: str, match: str) -> None:
    with pytest.raises(natrio.ConfigurationError, match=re.escape(match)):
        schedules.cron_spec(cron)


@pytest.mark.parametrize("cron", [None, 5, b"* * * * * *", ["*"] * 6])
def test_cron_must_be_a_string(cron: object) -> None:
    with pytest.raises(natrio.ConfigurationError, match="cron must be a str"):
        schedules.cron_spec(cron)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789*?,-/ abcdefjmnstuwy@\t\n\u0663"), max_size=40))
def test_any_cron_text_is_six_plain_fields_or_refused(cron: str) -> None:
    try:
        spec = schedules.cron_spec(cron)
    except natrio.ConfigurationError:
        return
    assert spec in schedules.CRON_SHORTHANDS or (
        len(spec.split(" ")) == 6 and re.fullmatch(r"[0-9A-Za-z*?,/ -]+", spec)
    )


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires"])
def test_time_zones(zone: str) -> None:
    assert schedules.check_time_zone(zone) == zone


@pytest.mark.parametrize(
    "zone",
    [
        "",
        "Nowhere/Special",
        "../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        "Europe//Paris",
        "Local",
        "Europe/Paris\n",
        "Europe/Paris ",
        "x" * 40,
        3,
        None,
    ],
)
def test_bad_time_zones(zone: object) -> None:
    with pytest.raises(natrio.ConfigurationError, match="time zone"):
        schedules.check_time_zone(zone)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "give every or cron"),
        ({"every": 5, "cron": "* * * * * *"}, "give every or cron"),
        ({"every": 5, "time_zone": "UTC"}, "time_zone applies to cron only"),
        ({"cron": "* * * * * *", "time_zone": "Mars/Olympus"}, "time zone"),
    ],
)
def test_recurring_options(options: dict[str, object], match: str) -> None:
    with pytest.raises(natrio.ConfigurationError, match=match):
        schedules.recurring_spec(**options)


def test_recurring_specs() -> None:
    assert schedules.recurring_spec(every=3) == ("@every 3s", None)
    assert schedules.recurring_spec(cron="0 0 3 * * *", time_zone="Europe/Paris") == (
        "0 0 3 * * *",
        "Europe/Paris",
    )


# -- start times ------------------------------------------------------------------------

NOW = 1_800_000_000.0


def test_start_times() -> None:
    assert schedules.start_time(None, None, NOW) is None
    assert schedules.start_time(None, 2.5, NOW) == NOW + 2.5
    assert schedules.start_time(None, 0, NOW) == NOW
    assert schedules.start_time(None, timedelta(minutes=1), NOW) == NOW + 60
    at = datetime(2027, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=2)))
    assert schedules.start_time(at, None, NOW) == at.timestamp()
    # A time in the past fires at once.
    assert schedules.start_time(datetime(2000, 1, 1, tzinfo=UTC), None, NOW) is not None


@pytest.mark.parametrize(
    ("start_at", "delay", "match"),
    [
        (datetime(2027, 1, 1, tzinfo=UTC), 5, "not both"),
        (datetime(2027, 1, 1), None, "timezone-aware"),
        ("2027-01-01T00:00:00Z", None, "must be a datetime"),
        (1_900_000_000, None, "must be a datetime"),
        (None, -1, "delay"),
        (None, math.nan, "delay"),
        (None, math.inf, "delay"),
        (None, True, "delay"),
        (None, "5", "delay"),
        (None, timedelta(seconds=-1), "delay"),
        (None, 1e300, "out of range"),
        (datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-5))), None, "range"),
    ],
)
def test_bad_start_times(start_at: object, delay: object, match: str) -> None:
    with pytest.raises(natrio.ConfigurationError, match=match):
        schedules.start_time(start_at, delay, NOW)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers())
def test_any_delay_is_a_start_time_or_refused(delay: float) -> None:
    try:
        when = schedules.start_time(None, delay, NOW)
    except natrio.ConfigurationError:
        return
    assert when is not None
    assert when >= NOW
    assert re.fullmatch(
        r"@at [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z",
        schedules.at_spec(when),
    )


def test_at_specs_are_utc_rfc3339() -> None:
    when = datetime(2027, 1, 2, 3, 4, 5, 600000, tzinfo=UTC).timestamp()
    assert schedules.at_spec(when) == "@at 2027-01-02T03:04:05.600000Z"
    target = wire.task_subject("t", "default", "r", "s")
    assert schedules.delayed_headers(when, target) == {
        "Nats-Schedule": "@at 2027-01-02T03:04:05.600000Z",
        "Nats-Schedule-Target": target,
    }


# -- ids, versions, stored schedules -------------------------------------------------------


def test_schedule_ids() -> None:
    assert schedules.check_schedule_id("x" * 100) == "x" * 100
    for bad in ["", "a.b", "a b", "a*", "x" * 101, "ä", None, 5]:
        with pytest.raises(natrio.ConfigurationError, match="schedule id"):
            schedules.check_schedule_id(bad)


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9_=-]{1,100}", fullmatch=True),
    st.integers(min_value=1, max_value=10**20 - 1),
)
def test_firing_run_ids_are_run_ids_and_read_back(schedule_id: str, stamp: int) -> None:
    run_id = schedules.firing_run_id(schedule_id, stamp)
    assert ID.fullmatch(run_id)
    assert schedules.parse_firing_run_id(run_id) == (schedule_id, stamp)


@pytest.mark.parametrize(
    "run_id", ["plain", "a=", "=123", "a=01", "a=x1", "a.b=1", "x" * 101 + "=1"]
)
def test_run_ids_that_are_not_firings(run_id: str) -> None:
    assert schedules.parse_firing_run_id(run_id) is None


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("2.11.9", False),
        ("2.10.0", False),
        ("1.99.0", False),
        ("2.12.0", True),
        ("v2.15.1", True),
        ("2.12.0-RC.1", True),
        ("3.0.0", True),
        ("garbage", False),
        ("", False),
    ],
)
def test_server_versions(version: str, supported: bool) -> None:
    assert schedules.supports_schedules(version) is supported
    if supported:
        schedules.require_schedules(version)
    else:
        with pytest.raises(natrio.NatrioError, match=r"nats-server 2\.12 or later"):
            schedules.require_schedules(version)


def stored(spec: str, target: str, **more: str) -> dict[str, str]:
    return {
        "Nats-Schedule": spec,
        "Nats-Schedule-Target": target,
        "Nats-Rollup": "sub",
        "Nats-Sequence": "7",
        **more,
    }


def test_reading_stored_schedules() -> None:
    subject = wire.schedule_subject("t", "gpu", "nightly")
    target = wire.task_subject("t", "gpu", "nightly", "step=1")
    assert schedules.read_schedule(subject, stored("@every 30s", target)) == natrio.Schedule(
        "nightly", "t", "gpu", "step=1", "@every 30s"
    )
    zoned = stored("0 0 3 * * *", target, **{"Nats-Schedule-Time-Zone": "Europe/Paris"})
    assert schedules.read_schedule(subject, zoned) == natrio.Schedule(
        "nightly", "t", "gpu", "step=1", "0 0 3 * * *", "Europe/Paris"
    )


@pytest.mark.parametrize(
    ("subject", "headers"),
    [
        ("natrio.schedule.t.gpu", stored("@every 30s", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.gpu.n.x", stored("@every 30s", "natrio.task.t.gpu.n.s")),
        ("natrio.delayed.t.gpu.n", stored("@every 30s", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.g.p.n", stored("@every 30s", "natrio.task.t.g.p.n.s")),
        ("natrio.schedule.t.gpu." + "n" * 101, stored("@every 30s", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.gpu.n", {}),
        ("natrio.schedule.t.gpu.n", stored("@every 0s", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.gpu.n", stored("@every 30m", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.gpu.n", stored("@at 2027-01-01T00:00:00Z", "natrio.task.t.gpu.n.s")),
        ("natrio.schedule.t.gpu.n", stored("0 0 * * *", "natrio.task.t.gpu.n.s")),
        (
            "natrio.schedule.t.gpu.n",
            stored("@every 1s", "natrio.task.t.gpu.n.s", **{"Nats-Schedule-Time-Zone": "UTC"}),
        ),
        (
            "natrio.schedule.t.gpu.n",
            stored("0 * * * * *", "natrio.task.t.gpu.n.s", **{"Nats-Schedule-Time-Zone": "X/Y"}),
        ),
        ("natrio.schedule.t.gpu.n", stored("@every 1s", "natrio.task.t.gpu.other.s")),
        ("natrio.schedule.t.gpu.n", stored("@every 1s", "natrio.task.u.gpu.n.s")),
        ("natrio.schedule.t.gpu.n", stored("@every 1s", "natrio.task.t.gpu~p1.n.s")),
        ("natrio.schedule.t.gpu.n", stored("@every 1s", "natrio.task.t.gpu.n.s.x")),
        ("natrio.schedule.t.gpu.n", stored("@every 1s", "natrio.task.t.gpu.n.")),
        ("natrio.schedule.t.gpu.n", {"Nats-Schedule": "@every 1s"}),
    ],
)
def test_messages_on_schedule_subjects_that_are_not_natrios(
    subject: str, headers: Mapping[str, str]
) -> None:
    assert schedules.read_schedule(subject, headers) is None


@pytest.mark.parametrize(
    ("subject", "valid"),
    [
        ("natrio.schedule.t.g.s", True),
        ("natrio.schedule.t.g." + "s" * 100, True),
        ("natrio.schedule.t.g." + "s" * 101, False),
        ("natrio.schedule.t~x.g.s", False),
        ("natrio.schedule.t.g\u00e4.s", False),
        ("natrio.schedule.t.g.s.x", False),
        ("natrio.delayed.t.g.s", False),
        ("natrio.schedule.t.g", False),
    ],
)
def test_schedule_subjects(subject: str, valid: bool) -> None:
    assert schedules.valid_schedule_subject(subject) is valid


def test_an_identical_schedule_is_the_same_whatever_the_server_added() -> None:
    mine = {"Nats-Schedule": "@every 1s", "Nats-Schedule-Target": "natrio.task.t.d.n.t", "X": "1"}
    served = mine | {"Nats-Rollup": "sub", "Nats-Sequence": "4", "Nats-Time-Stamp": "now"}
    assert schedules.same_schedule(b"in", served, b"in", mine)
    assert not schedules.same_schedule(b"in", served, b"other", mine)
    assert not schedules.same_schedule(b"in", served, b"in", mine | {"X": "2"})
    assert not schedules.same_schedule(b"in", served, b"in", mine | {"Nats-Schedule": "@every 2s"})
    zoned = mine | {"Nats-Schedule-Time-Zone": "UTC"}
    assert not schedules.same_schedule(b"in", served, b"in", zoned)


def test_a_trigger_keeps_the_callers_headers_and_the_retry_policy() -> None:
    headers = stored("@every 1s", "natrio.task.t.d.n.t", **{"X-Trace": "1", "Natrio-Retry": "{}"})
    headers["Natrio-Deadline"] = "1"
    assert schedules.trigger_headers(headers) == ({"X-Trace": "1"}, "{}")


# -- the wire edge ----------------------------------------------------------------------


def fired(
    subject: str,
    headers: Mapping[str, str],
    *,
    reply: str = ACK,
    group: str = "default",
) -> natrio.Task:
    return read_task(
        Message(subject, b"in", reply, dict(headers)),
        task_type="t",
        group=group,
        inbox_prefix="_INBOX",
    )


def firing(scheduler: str, next_time: str = NEXT) -> dict[str, str]:
    return {wire.H_SCHEDULER: scheduler, wire.H_SCHEDULE_NEXT: next_time}


def test_a_delayed_task_keeps_its_run_id() -> None:
    task = fired("natrio.task.t.default.r1.s", firing("natrio.delayed.t.default.r1.s", "purge"))
    assert (task.run_id, task.step_id, task.seq) == ("r1", "s", 5)
    assert task.headers[wire.H_SCHEDULER] == "natrio.delayed.t.default.r1.s"


def test_a_placed_delayed_task_names_its_plain_group() -> None:
    task = fired(
        "natrio.task.t.default~p3.r1.s",
        firing("natrio.delayed.t.default.r1.s", "purge"),
        group="default~p3",
    )
    assert (task.run_id, task.placement) == ("r1", "p3")


@pytest.mark.parametrize(
    ("reply", "stamp"), [(ACK, 1700000000123456789), (ACK_V2, 1700000000000000001)]
)
@pytest.mark.parametrize("next_time", [NEXT, "2026-12-02T14:00:00.5+01:00", "purge"])
def test_every_firing_of_a_schedule_is_a_run_of_its_own(
    reply: str, stamp: int, next_time: str
) -> None:
    task = fired(
        "natrio.task.t.default.nightly.s",
        firing("natrio.schedule.t.default.nightly", next_time),
        reply=reply,
    )
    assert task.run_id == f"nightly={stamp}"
    assert task.step_id == "s"
    assert ack_timestamp(reply) == stamp


@pytest.mark.parametrize(
    ("subject", "headers", "match"),
    [
        # One without the other.
        (
            "natrio.task.t.default.r1.s",
            {wire.H_SCHEDULER: "natrio.delayed.t.default.r1.s"},
            "together",
        ),
        ("natrio.task.t.default.r1.s", {wire.H_SCHEDULE_NEXT: "purge"}, "together"),
        # Forged: another task's, another type's or group's schedule, or not natrio's.
        (
            "natrio.task.t.default.r1.s",
            firing("natrio.delayed.t.default.r2.s", "purge"),
            "not this",
        ),
        (
            "natrio.task.t.default.r1.s",
            firing("natrio.delayed.t.default.r1.x", "purge"),
            "not this",
        ),
        (
            "natrio.task.t.default.r1.s",
            firing("natrio.delayed.u.default.r1.s", "purge"),
            "not this",
        ),
        ("natrio.task.t.default.r1.s", firing("natrio.delayed.t.gpu.r1.s", "purge"), "not this"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.r2"), "not this"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.*"), "not this"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.>"), "not this"),
        ("natrio.task.t.default.r1.s", firing("$JS.API.STREAM.DELETE.NATRIO_TASKS"), "not this"),
        ("natrio.task.t.default.r1.s", firing("natrio.task.t.default.r1.s"), "not this"),
        ("natrio.task.t.default.r1.s", firing(""), "not this"),
        # A delayed task fires once.
        ("natrio.task.t.default.r1.s", firing("natrio.delayed.t.default.r1.s"), "fires once"),
        # Nats-Schedule-Next is purge or a time.
        ("natrio.task.t.default.r1.s", firing("natrio.delayed.t.default.r1.s", "Purge"), "bad"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.r1", "soon"), "bad"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.r1", ""), "bad"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.r1", NEXT + " "), "bad"),
        ("natrio.task.t.default.r1.s", firing("natrio.schedule.t.default.r1", "1700000000"), "bad"),
        # A schedule id too long for a firing's run id.
        (
            f"natrio.task.t.default.{'n' * 101}.s",
            firing(f"natrio.schedule.t.default.{'n' * 101}"),
            "over 100 characters",
        ),
        # Schedule headers other than a fired task's: a schedule message on a task subject.
        ("natrio.task.t.default.r1.s", {"Nats-Schedule": "@every 1s"}, "message-schedule header"),
        ("natrio.task.t.default.r1.s", {"Nats-Schedule-Target": "x"}, "message-schedule header"),
        ("natrio.task.t.default.r1.s", {"Nats-Schedule-TTL": "5s"}, "message-schedule header"),
        ("natrio.task.t.default.r1.s", {"Nats-Schedule-Source": "x"}, "message-schedule header"),
        (
            "natrio.task.t.default.r1.s",
            {"nats-scheduler": "natrio.delayed.t.default.r1.s", wire.H_SCHEDULE_NEXT: "purge"},
            "message-schedule header",
        ),
        (
            "natrio.task.t.default.r1.s",
            firing("natrio.delayed.t.default.r1.s", "purge") | {"NATS-SCHEDULE-NEXT": "purge"},
            "message-schedule header",
        ),
    ],
)
def test_forged_or_foreign_schedule_headers_are_malformed(
    subject: str, headers: Mapping[str, str], match: str
) -> None:
    with pytest.raises(MalformedTask, match=match):
        fired(subject, headers)


def test_a_firing_needs_a_stream_timestamp() -> None:
    headers = firing("natrio.schedule.t.default.nightly")
    for reply in (
        "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.0.0",
        "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.x.0",
    ):
        with pytest.raises(MalformedTask, match="stream timestamp"):
            fired("natrio.task.t.default.nightly.s", headers, reply=reply)


@settings(max_examples=400, deadline=None)
@given(
    scheduler=st.one_of(
        st.none(),
        st.text(max_size=80),
        st.sampled_from(
            [
                "natrio.delayed.t.default.r1.s",
                "natrio.schedule.t.default.r1",
                "natrio.schedule.t.default.r2",
                "natrio.delayed.t.default.r1.s2",
            ]
        ),
    ),
    next_time=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["purge", NEXT])),
    reply=st.sampled_from([ACK, ACK_V2, "$JS.ACK.NATRIO_TASKS.t~default.1.5.5.07.0"]),
)
def test_any_schedule_headers_give_a_run_of_this_task_or_malformed(
    scheduler: str | None, next_time: str | None, reply: str
) -> None:
    headers: dict[str, str] = {}
    if scheduler is not None:
        headers[wire.H_SCHEDULER] = scheduler
    if next_time is not None:
        headers[wire.H_SCHEDULE_NEXT] = next_time
    try:
        task = fired("natrio.task.t.default.r1.s", headers, reply=reply)
    except MalformedTask:
        return
    assert ID.fullmatch(task.run_id)
    if not headers:
        assert task.run_id == "r1"
    elif scheduler == "natrio.delayed.t.default.r1.s":
        assert (task.run_id, next_time) == ("r1", "purge")
    else:
        assert scheduler == "natrio.schedule.t.default.r1"
        assert task.run_id == f"r1={ack_timestamp(reply)}"


# -- against a real server: delayed tasks ------------------------------------------------


async def start_recording_worker(
    factory: WorkerFactory, task_type: str = "job"
) -> trio.MemoryReceiveChannel[tuple[float, natrio.Task]]:
    """A worker whose handler reports (wall clock, task) of every execution."""
    send, receive = trio.open_memory_channel[tuple[float, natrio.Task]](math.inf)
    worker = factory()

    @worker.handle(task_type)
    async def job(ctx: natrio.TaskContext) -> bytes:
        send.send_nowait((time.time(), ctx.task))
        return b"done " + ctx.input

    await factory.start(worker)
    return receive


async def test_a_delayed_task_runs_at_its_time(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    start = datetime.now(UTC) + timedelta(seconds=2)
    handle = await natrio_client.submit("job", b"x", run_id="later", start_at=start)
    assert not handle.duplicate
    with trio.fail_after(10):
        ran, task = await runs.receive()
    assert start.timestamp() - 0.05 <= ran <= start.timestamp() + 1.0
    assert (task.run_id, task.step_id) == ("later", "job")
    assert task.headers[wire.H_SCHEDULER] == "natrio.delayed.job.default.later.job"
    assert wire.H_MSG_ID not in task.headers  # the server drops it from the fired copy


async def test_a_delayed_partitioned_task_goes_to_its_keys_partition_when_it_fires(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    from natrio._routing.placement import partition_of

    worker = natrio_worker_factory()
    ran: list[int | None] = []

    @worker.handle("ledger", partitions=4)
    async def ledger(ctx: natrio.TaskContext) -> bytes:
        ran.append(ctx.task.partition)
        return b"booked"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("ledger", b"", key="account-9", delay=0.5)
    with trio.fail_after(10):
        assert await handle.result() == b"booked"
    # Stored on the plain subject, moved into the partition by the key it carries.
    assert ran == [partition_of("account-9", 4)]
    assert worker.statistics().dispatcher.forwarded == 1


async def test_result_waits_across_the_delay_on_the_direct_reply(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    await start_recording_worker(natrio_worker_factory)
    assert natrio_client.check_interval == 5.0
    began = time.time()
    handle = await natrio_client.submit("job", b"x", delay=1.5)
    with trio.fail_after(10):
        assert await handle.result() == b"done x"
    # Before the first look into the events stream (5 s): the worker's direct reply.
    assert 1.4 <= time.time() - began < 4.0
    # A handle made elsewhere reads the same outcome from the events stream.
    other = natrio_client.handle("job", handle.run_id, handle.step_id)
    with trio.fail_after(5):
        assert await other.result() == b"done x"


async def test_a_relative_deadline_of_a_delayed_task_counts_from_its_start(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    submitted = time.time()
    # Counted from the submit, the deadline would pass a second before the task starts.
    handle = await natrio_client.submit("job", b"x", delay=2.0, deadline=1.0)
    with trio.fail_after(10):
        assert await handle.result() == b"done x"
        _, task = await runs.receive()
    assert task.deadline is not None
    assert submitted + 3.0 <= task.deadline < submitted + 3.5


async def test_a_repeated_delayed_submit_is_a_duplicate(
    natrio_connection: natrio.Connection,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    first = await natrio_client.submit("job", b"1", run_id="once", delay=1.0)
    again = await natrio_client.submit("job", b"2", run_id="once", delay=0.5)
    # A plain submit of the same ids is the same task too.
    plain = await natrio_client.submit("job", b"3", run_id="once")
    assert (first.duplicate, again.duplicate, plain.duplicate) == (False, True, True)
    assert first.seq == again.seq == plain.seq
    with trio.fail_after(10):
        for handle in (first, again, plain):
            assert await handle.result() == b"done 1"
    assert await event_counts(natrio_connection, "completed") == {
        "natrio.event.job.once.job.completed": 1
    }
    assert runs.statistics().current_buffer_used == 1


async def test_delayed_tasks_cannot_be_targeted(natrio_client: natrio.Client) -> None:
    with pytest.raises(natrio.ConfigurationError, match="cannot be targeted"):
        await natrio_client.submit("job", delay=1, target="w-someone")
    with pytest.raises(natrio.ConfigurationError, match="not both"):
        await natrio_client.submit("job", delay=1, start_at=datetime.now(UTC))


@pytest.mark.parametrize("name", ["Nats-Schedule", "Nats-Rollup", "nats-ttl", "Natrio-Reply"])
async def test_jetstreams_headers_cannot_be_given(natrio_client: natrio.Client, name: str) -> None:
    with pytest.raises(natrio.ConfigurationError, match="Nats-"):
        await natrio_client.submit("job", headers={name: "x"})
    with pytest.raises(natrio.ConfigurationError, match="Nats-"):
        await natrio_client.schedule("job", schedule_id="s", every=5, headers={name: "x"})


# -- against a real server: recurring schedules ------------------------------------------


async def firings_of(
    runs: trio.MemoryReceiveChannel[tuple[float, natrio.Task]], count: int
) -> list[natrio.Task]:
    tasks: list[natrio.Task] = []
    with trio.fail_after(count + 5):
        while len(tasks) < count:
            _, task = await runs.receive()
            tasks.append(task)
    return tasks


async def test_a_recurring_schedule_fires_distinct_runs(
    natrio_connection: natrio.Connection,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    made = await natrio_client.schedule("job", b"tick", schedule_id="ticker", every=1)
    assert made == natrio.Schedule("ticker", "job", "default", "job", "@every 1s")
    tasks = await firings_of(runs, 3)
    run_ids = [task.run_id for task in tasks]
    assert len(set(run_ids)) == 3
    stamps = []
    for task in tasks:
        parsed = schedules.parse_firing_run_id(task.run_id)
        assert parsed is not None
        assert parsed[0] == "ticker"
        stamps.append(parsed[1])
        assert task.input == b"tick"
        assert task.headers[wire.H_SCHEDULER] == "natrio.schedule.job.default.ticker"
        assert schedules.NEXT_TIME.fullmatch(task.headers[wire.H_SCHEDULE_NEXT])
    # A second apart, each at a whole second (the server aligns @every to them).
    assert all(0.5e9 < b - a < 1.5e9 for a, b in itertools.pairwise(stamps))
    assert all(stamp % 10**9 < 0.5e9 for stamp in stamps)
    for run_id in run_ids:
        handle = natrio_client.handle("job", run_id, "job")
        with trio.fail_after(5):
            assert await handle.result() == b"done tick"
    completed = await event_counts(natrio_connection, "completed")
    assert all(completed[f"natrio.event.job.{run_id}.job.completed"] == 1 for run_id in run_ids)


async def test_cancel_stops_the_firings(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    await natrio_client.schedule("job", schedule_id="brief", every=1)
    await firings_of(runs, 1)
    assert await natrio_client.cancel_schedule("brief") is True
    cancelled = time.time_ns()
    assert await natrio_client.schedules() == []
    assert await natrio_client.cancel_schedule("brief") is False
    # Waited out rather than awaited: what is checked is that nothing more comes.
    with trio.move_on_after(2.5):
        while True:
            _, task = await runs.receive()
            # Only a firing stored before the cancel may still run.
            parsed = schedules.parse_firing_run_id(task.run_id)
            assert parsed is not None
            assert parsed[1] < cancelled


async def test_trigger_runs_now_and_the_schedule_goes_on(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    await natrio_client.schedule(
        "job", b"hourly", schedule_id="slow", every=3600, headers={"X-Origin": "schedule"}
    )
    began = time.time()
    handle = await natrio_client.trigger("slow")
    with trio.fail_after(5):
        assert await handle.result() == b"done hourly"
        ran, task = await runs.receive()
    assert ran - began < 1.0
    parsed = schedules.parse_firing_run_id(handle.run_id)
    assert parsed is not None
    assert parsed[0] == "slow"
    assert task.run_id == handle.run_id
    assert task.headers["X-Origin"] == "schedule"
    assert wire.H_SCHEDULER not in task.headers
    assert [s.schedule_id for s in await natrio_client.schedules()] == ["slow"]

    # A schedule firing every second keeps firing after a trigger.
    await natrio_client.schedule("job", b"fast", schedule_id="fast", every=1)
    triggered = await natrio_client.trigger("fast")
    with trio.fail_after(5):
        assert await triggered.result() == b"done fast"
    after = [t for t in await firings_of(runs, 4) if t.run_id != triggered.run_id]
    assert len([t for t in after if wire.H_SCHEDULER in t.headers]) >= 2
    with pytest.raises(natrio.NatrioError, match="no schedule 'nothing'"):
        await natrio_client.trigger("nothing")


async def test_listing_replacing_and_leaving_schedules_alone(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    await natrio_client.schedule(
        "report", schedule_id="nightly", cron="0 0 3 * * *", time_zone="Europe/Paris"
    )
    await natrio_client.schedule("job", schedule_id="a-every", every=timedelta(minutes=5))
    assert await natrio_client.schedules() == [
        natrio.Schedule("a-every", "job", "default", "job", "@every 300s"),
        natrio.Schedule("nightly", "report", "default", "report", "0 0 3 * * *", "Europe/Paris"),
    ]
    js = JetStream(natrio_connection)
    subject = wire.schedule_subject("job", "default", "a-every")
    before = await js.last_message(wire.TASK_STREAM, subject)
    # The same schedule again is left as it is (storing it again would restart the interval).
    await natrio_client.schedule("job", schedule_id="a-every", every=300)
    after = await js.last_message(wire.TASK_STREAM, subject)
    assert before is not None
    assert after is not None
    assert after.header("Nats-Sequence") == before.header("Nats-Sequence")
    # An id names one schedule, whatever its task type and group: this replaces it.
    await natrio_client.schedule("other", schedule_id="a-every", every=60, group="gpu")
    assert (await natrio_client.schedules())[0] == natrio.Schedule(
        "a-every", "other", "gpu", "other", "@every 60s"
    )
    assert await js.last_message(wire.TASK_STREAM, subject) is None
    # A message on a schedule subject that is not natrio's schedule is not listed, and one
    # on a subject natrio would not make is not even read.
    await js.publish(wire.schedule_subject("job", "default", "stray"), b"not a schedule")
    await js.publish("natrio.schedule.job~x.default.a-every", b"not natrio's")
    assert len(await natrio_client.schedules()) == 2
    await natrio_client.schedule("other", schedule_id="a-every", every=60, group="gpu")
    assert len(await natrio_client.schedules()) == 2


async def test_cron_the_server_would_never_fire_is_refused(natrio_client: natrio.Client) -> None:
    with pytest.raises(natrio.ConfigurationError, match="server refuses"):
        await natrio_client.schedule("job", schedule_id="never", cron="0 0 0 30 2 *")


@pytest.mark.parametrize(
    "options",
    [
        {"schedule_id": "s"},
        {"schedule_id": "s", "every": 1, "cron": "* * * * * *"},
        {"schedule_id": "s", "every": 0.5},
        {"schedule_id": "s", "every": 1, "time_zone": "UTC"},
        {"schedule_id": "s", "cron": "* * * * *"},
        {"schedule_id": "s", "cron": "* * * * * *", "time_zone": "Nowhere/Else"},
        {"schedule_id": "a.b", "every": 1},
        {"schedule_id": "x" * 101, "every": 1},
        {"schedule_id": "s", "every": 1, "group": "a.b"},
        {"schedule_id": "s", "every": 1, "step_id": "a b"},
        {"schedule_id": "s", "every": 1, "retry": "fast"},
    ],
)
async def test_bad_schedule_options(
    natrio_client: natrio.Client, options: dict[str, object]
) -> None:
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.schedule("job", **options)  # type: ignore[arg-type]
    assert await natrio_client.schedules() == []


async def test_an_agent_loop_fired_by_a_schedule_stays_in_its_run(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    send, receive = trio.open_memory_channel[natrio.Task](math.inf)
    worker = natrio_worker_factory()

    @worker.handle("loop")
    async def loop(ctx: natrio.TaskContext) -> bytes:
        send.send_nowait(ctx.task)
        if ctx.iteration < 2:
            await ctx.continue_with(b"again")
        return b"looped"

    await natrio_worker_factory.start(worker)
    await natrio_client.schedule("loop", schedule_id="looper", every=1)
    with trio.fail_after(10):
        first = await receive.receive()
        while True:  # later firings may come in between
            second = await receive.receive()
            if second.iteration == 2:
                break
    await natrio_client.cancel_schedule("looper")
    assert schedules.parse_firing_run_id(first.run_id) is not None
    assert (second.run_id, second.input) == (first.run_id, b"again")
    assert wire.H_SCHEDULER not in second.headers
    with trio.fail_after(5):
        assert await natrio_client.handle("loop", first.run_id, "loop").result() == b"looped"


async def test_a_schedule_survives_a_server_restart(
    natrio_server: natrio.EmbeddedServer,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    await natrio_client.schedule("job", schedule_id="durable", every=1)
    await firings_of(runs, 1)
    await trio.to_thread.run_sync(natrio_server.kill)
    await trio.to_thread.run_sync(natrio_server.start)
    restarted = time.time_ns()
    with trio.fail_after(20):
        while True:
            _, task = await runs.receive()
            parsed = schedules.parse_firing_run_id(task.run_id)
            assert parsed is not None
            if parsed[1] > restarted:
                break
    assert [s.schedule_id for s in await natrio_client.schedules()] == ["durable"]


async def test_a_delayed_task_overdue_after_a_server_restart_fires_at_once(
    natrio_server: natrio.EmbeddedServer,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    due = time.time() + 1.0
    await natrio_client.submit("job", b"x", run_id="overdue", delay=1.0)
    await trio.to_thread.run_sync(natrio_server.kill)
    # Down past the task's time: the scenario, not a wait for something to happen.
    await trio.sleep(max(due - time.time(), 0) + 0.5)
    await trio.to_thread.run_sync(natrio_server.start)
    restarted = time.time()
    with trio.fail_after(20):
        ran, task = await runs.receive()
    assert task.run_id == "overdue"
    assert ran - restarted < 5.0  # at once, give or take the worker's reconnect


# -- against a real server: safety, provisioning ------------------------------------------


async def test_a_forged_fired_task_is_dead_lettered_and_not_run(
    natrio_connection: natrio.Connection,
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
) -> None:
    runs = await start_recording_worker(natrio_worker_factory)
    js = JetStream(natrio_connection)
    # The server lets any client send purge with a scheduler that holds no message.
    await js.publish(
        "natrio.task.job.default.forged.job",
        b"forged",
        headers={
            wire.H_SCHEDULER: "natrio.schedule.job.default.victim",
            "Nats-Schedule-Next": "purge",
        },
    )
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
        await natrio_client.handle("job", "forged", "job").result()
    assert failed.value.error.kind == "malformed"
    assert "is not this task's schedule" in failed.value.error.message
    # A client cannot forge the header of a recurring firing: the server refuses it.
    with pytest.raises(natrio.JetStreamError):
        await js.publish(
            "natrio.task.job.default.victim.job",
            b"forged",
            headers={
                wire.H_SCHEDULER: "natrio.schedule.job.default.victim",
                "Nats-Schedule-Next": NEXT,
            },
        )
    # The worker goes on with real tasks, and ran none of the forged ones.
    with trio.fail_after(10):
        assert await (await natrio_client.submit("job", b"real")).result() == b"done real"
        _, task = await runs.receive()
    assert task.input == b"real"


OLD_TASK_STREAM = {
    "name": wire.TASK_STREAM,
    "subjects": ["natrio.task.>"],
    "retention": "workqueue",
    "duplicate_window": 600 * 10**9,
}


async def test_provision_enables_schedules_on_an_existing_task_stream(
    natrio_server: natrio.EmbeddedServer,
) -> None:
    async with natrio.connect(natrio_server.url) as nc:
        await natrio.provision(nc)
        js = JetStream(nc)
        # The task stream as natrio provisioned it before schedules.
        await js.api(f"STREAM.DELETE.{wire.TASK_STREAM}")
        await js.ensure_stream(OLD_TASK_STREAM)
        client = natrio.Client(nc)
        with pytest.raises(natrio.NatrioError, match=r"provision\(\).*2\.12"):
            await client.submit("job", delay=1)
        with pytest.raises(natrio.NatrioError, match=r"provision\(\).*2\.12"):
            await client.schedule("job", schedule_id="s", every=1)
        # Schedule subjects in the stream, but schedules not allowed.
        await js.ensure_stream(
            OLD_TASK_STREAM
            | schedules.task_schedules_config()
            | {
                "allow_msg_schedules": False,
                "allow_rollup_hdrs": False,
            }
        )
        with pytest.raises(natrio.NatrioError, match=r"does not hold message schedules"):
            await client.submit("job", delay=1)
        await natrio.provision(nc)
        await natrio.provision(nc)
        config = (await js.stream_info(wire.TASK_STREAM))["config"]
        assert config["allow_msg_schedules"]
        assert config["allow_direct"]
        assert set(config["subjects"]) == {"natrio.task.>", "natrio.delayed.>", "natrio.schedule.>"}
        handle = await client.submit("job", delay=0)
        assert handle.seq is not None


async def test_schedules_waiting_in_the_task_stream_are_not_counted_as_tasks(
    natrio_client: natrio.Client,
) -> None:
    await natrio_client.submit("later", b"", delay=3600)
    await natrio_client.schedule("later", b"", schedule_id="hourly", every=timedelta(hours=1))
    await natrio_client.submit("now", b"")
    overview = await natrio_client.overview()
    assert (overview.stored_tasks, overview.unserved) == (1, 1)
