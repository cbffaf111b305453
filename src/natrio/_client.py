"""The client: submit tasks, await their results, read dead letters."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

import trio

from . import _schedules as schedules
from . import _wire as wire
from ._codec import decode, encode
from ._dead_letters import (
    DeadLetterReader,
    check_duplicate,
    entry_at,
    newer_task,
    purge,
    read_input,
    replay_headers,
    replay_placement,
    settle_replayed,
    warn_dropped,
    warn_kept,
)
from ._errors import (
    ConfigurationError,
    JetStreamError,
    NatrioError,
    NoResponders,
    TaskFailed,
)
from ._history import DEFAULT_LIMIT, RunHistory, read_history
from ._jetstream import CONSUMER_NOT_FOUND, JetStream, server_header
from ._model import DeadLetter, TaskError
from ._overview import Overview, read_overview
from ._retry import RetryPolicy
from ._routing.partitions import stored_partitions
from ._routing.placement import check_claim, partition_of, worker_target
from ._schedules import Schedule
from ._state import StepState
from ._telemetry import telemetry_option
from ._transport import Connection, Message, Reply, Subscription
from ._transport.protocol import valid_header_name

if TYPE_CHECKING:
    from .otel import Telemetry

T = TypeVar("T")


def _deadline(
    value: float | timedelta | datetime | None, start: float | None = None
) -> float | None:
    # A relative deadline counts from ``start`` (a delayed task's start time), else now.
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError("deadline datetime must be timezone-aware")
        return value.timestamp()
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ConfigurationError(
            f"deadline must be > 0 seconds from now, a timedelta or a datetime, got {value!r}"
        )
    return (time.time() if start is None else start) + float(seconds)


def _extra_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's own headers of a task, checked: natrio's (``Natrio-*``) and
    JetStream's (``Nats-*``: the task stream acts on rollups and schedules) are refused."""
    checked: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if (
            not isinstance(key, str)
            or not isinstance(value, str)
            or not valid_header_name(key)
            or key.lower().startswith(("natrio-", "nats-"))
            or "\r" in value
            or "\n" in value
        ):
            raise ConfigurationError(
                "headers must map names (RFC 7230 tokens, not Natrio-* or Nats-*) to "
                f"single-line strings, got {key!r}: {value!r}"
            )
        checked[key] = value
    return checked


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TaskHandle:
    """A submitted task: its identity, and :meth:`result` to wait for its outcome.

    Build one for a task submitted elsewhere with :meth:`Client.handle`; its result is
    read from the events stream.
    """

    def __init__(
        self,
        client: Client,
        task_type: str,
        run_id: str,
        step_id: str,
        *,
        group: str | None = None,
        seq: int | None = None,
        duplicate: bool = False,
        slot: Reply | None = None,
    ) -> None:
        self.client = client
        self.task_type = task_type
        self.run_id = run_id
        self.step_id = step_id
        self.group = group
        self.seq = seq
        self.duplicate = duplicate
        self._slot = slot

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_type} {self.run_id}/{self.step_id}>"

    async def worker(self) -> str:
        """The id of the worker that completed the task (waiting for its outcome first)."""
        message = await self._outcome()
        worker = message.header(wire.H_WORKER)
        if not worker:
            raise NatrioError(f"the outcome of {self!r} does not name its worker")
        return worker

    async def worker_target(self) -> str:
        """The claim of the worker that completed the task: ``target=`` this (or
        ``colocate_with=`` the handle) sends a step to the same worker, or to the next one
        started under its name."""
        worker_id = await self.worker()
        # <worker_name>.<random>@<hostname>; names have no '.' in them.
        name = worker_id.partition("@")[0].rpartition(".")[0]
        if not name:
            raise NatrioError(f"cannot read a worker name from {worker_id[:200]!r}")
        return worker_target(name)

    @overload
    async def result(self, output_type: None = None) -> bytes: ...

    @overload
    async def result(self, output_type: type[T]) -> T: ...

    async def result(self, output_type: Any = None) -> Any:
        """Wait for the task's outcome and return its output.

        With ``output_type`` the output is decoded into it (JSON via cattrs); without,
        the raw bytes are returned. Raises :class:`TaskFailed` when the task was
        dead-lettered. It waits as long as it takes: bound it with ``trio.fail_after``.
        """
        message = await self._outcome()
        return _read_outcome(self, message, output_type)

    async def _outcome(self) -> Message:
        slot = self._slot
        if slot is not None:
            # The worker replies directly; the events stream is the safety net for a reply
            # lost to a reconnect.
            while True:
                with trio.move_on_after(self.client.check_interval):
                    await slot.event.wait()
                if slot.message is not None:
                    return slot.message
                stored = await self.client._stored_outcome(self)
                if stored is not None:
                    return stored
        pattern = wire.event_subject(self.task_type, self.run_id, self.step_id, "*")
        sub = await self.client.nc.subscribe(pattern)
        async with sub:
            # Subscribed first, then look; and look again now and then: an event published
            # before the subscription reached the server may be stored only after the first
            # look was answered (JetStream stores and answers direct gets on different paths).
            while True:
                stored = await self.client._stored_outcome(self)
                if stored is not None:
                    return stored
                with trio.move_on_after(self.client.check_interval):
                    async for msg in sub:
                        if msg.subject.endswith((f".{wire.COMPLETED}", f".{wire.DEAD}")):
                            return msg


def _read_outcome(handle: TaskHandle, message: Message, output_type: Any) -> Any:
    outcome = message.header(wire.H_OUTCOME) or message.subject.rsplit(".", 1)[-1]
    if outcome == wire.DEAD:
        error = TaskError.from_dict(json.loads(message.data))
        raise TaskFailed(handle.task_type, handle.run_id, handle.step_id, error)
    return decode(message.data, output_type)


class StepStream:
    """A step's streamed output (``ctx.put_stream``), chunk by chunk, ending with the step.

    Use ``async with client.stream(run_id, step_id) as chunks: async for data in chunks``
    (plain ``async for`` works too; the subscription then lives until the end). Chunks are
    core NATS messages: only those published after the subscription began are seen. The
    iteration ends when the step completes or is dead-lettered (``outcome`` says which),
    or at once when it already had.
    """

    def __init__(self, client: Client, run_id: str, step_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.step_id = step_id
        self.outcome: str | None = None
        self._subs: list[Subscription] = []
        self._send, self._receive = trio.open_memory_channel[Message](math.inf)
        self._done = False

    async def _open(self) -> None:
        if self._subs:
            return
        # The chunks and the step's events share one channel: the worker publishes its
        # chunks before the outcome event on one connection, so they arrive in that order
        # and the outcome event ends the stream.
        push = self._send.send_nowait
        for subject in (
            wire.stream_subject(self.run_id, self.step_id),
            wire.event_subject("*", self.run_id, self.step_id, "*"),
        ):
            self._subs.append(await self.client.nc.subscribe(subject, on_message=push))
        # Subscribed first, then look: a step that already ended has nothing more to say.
        self.outcome = await self._stored_outcome()
        self._done = self.outcome is not None

    async def _stored_outcome(self) -> str | None:
        for kind in (wire.COMPLETED, wire.DEAD):
            info = await self.client.js.stream_info(
                wire.EVENT_STREAM,
                subjects_filter=f"{wire.PREFIX}.event.*.{self.run_id}.{self.step_id}.{kind}",
            )
            if (info.get("state") or {}).get("subjects"):
                return kind
        return None

    async def __aenter__(self) -> StepStream:
        await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening."""
        self._done = True
        with trio.CancelScope(shield=True):
            for sub in self._subs:
                await sub.unsubscribe()

    def __aiter__(self) -> StepStream:
        return self

    async def __anext__(self) -> bytes:
        await self._open()
        while not self._done:
            with trio.move_on_after(self.client.check_interval):
                msg = await self._receive.receive()
                if not msg.subject.startswith(_EVENT_PREFIX):
                    return msg.data
                kind = msg.subject.rsplit(".", 1)[-1]
                if kind not in (wire.COMPLETED, wire.DEAD):
                    continue  # started, failed, paused, continued: the step goes on
                self.outcome = kind
                break
            if self.outcome is None:
                # No outcome event for a while: it may have been lost to a reconnect.
                self.outcome = await self._stored_outcome()
                if self.outcome is None:
                    continue
            break
        await self.aclose()
        raise StopAsyncIteration


_EVENT_PREFIX = f"{wire.PREFIX}.event."


class Client:
    """Submits tasks and waits for their outcomes.

    ``check_interval`` is how often a waiting :meth:`TaskHandle.result` also looks in the
    events stream, in case the worker's direct reply was lost. ``telemetry``: ``True`` to
    wrap every task the client stores in an OpenTelemetry span whose trace context the
    task carries to its worker (the global tracer provider), or a
    :class:`natrio.otel.Telemetry` naming another (needs the ``otel`` extra; see
    docs/telemetry.md).
    """

    #: Seconds after which a task type found unpartitioned is looked up again.
    PARTITIONS_RECHECK = 2.0
    #: Seconds after which a stored partition count is read again.
    PARTITIONS_REFRESH = 30.0

    def __init__(
        self,
        nc: Connection,
        *,
        timeout: float = 5.0,
        check_interval: float = 5.0,
        telemetry: bool | Telemetry = False,
    ) -> None:
        self.nc = nc
        traced = telemetry_option(telemetry)
        # With telemetry, the JetStream API that traces the tasks it publishes: decided
        # here, so that a submit without it does what it always did.
        self.js = (
            JetStream(nc, timeout=timeout)
            if traced is None
            else traced._jetstream(nc, timeout=timeout)
        )
        self.check_interval = check_interval
        # Task type -> (partition count or None, when to look it up again).
        self._partitions: dict[str, tuple[int | None, float]] = {}

    async def submit(
        self,
        task_type: str,
        input: Any = b"",
        *,
        run_id: str | None = None,
        step_id: str | None = None,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        deadline: float | timedelta | datetime | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        target: str | None = None,
        colocate_with: TaskHandle | None = None,
        soft: bool = False,
        start_at: datetime | None = None,
        delay: float | timedelta | None = None,
    ) -> TaskHandle:
        """Put a task in the task stream and return its handle.

        ``input`` is bytes, or a value cattrs can unstructure (an attrs instance, say),
        sent as JSON. ``run_id`` is generated when absent; ``step_id`` defaults to the
        task type. Submitting the same task type, run id and step id again within the
        stream's duplicate window yields no second task (``handle.duplicate`` is true).
        ``group`` picks the worker group (``"default"``); ``retry`` overrides the
        worker's policy for this task; ``deadline`` is seconds from now, a timedelta or an
        aware datetime. Raises ConfigurationError for invalid names or options and
        PayloadTooLarge when the payload exceeds the server's max_payload.

        Routing (docs/routing.md): a partitioned task type's task goes to the partition
        of ``key`` (default: the run id, so a run's steps keep their order); ``target``
        runs it only on a worker holding that claim, ``colocate_with`` on the worker that
        completed the given handle's task (:func:`natrio.worker_target` of its name;
        this waits for that task's outcome first); with ``soft`` another worker takes it
        while no holder of the claim is alive.

        Delayed tasks (docs/schedules.md): with ``start_at`` (an aware datetime) or
        ``delay`` (seconds >= 0, or a timedelta) the task is stored now, as a message
        schedule, and runs at that time; ids, dedupe and :meth:`TaskHandle.result` are
        as for any task, and a relative ``deadline`` counts from the start time. Such a
        task cannot be targeted. It needs nats-server 2.12 or later and a task stream
        provisioned with message schedules (NatrioError otherwise).
        """
        wire.check_name("task type", task_type)
        group = wire.check_name("group", group) if group is not None else wire.DEFAULT_GROUP
        run_id = wire.check_id("run id", run_id) if run_id is not None else secrets.token_hex(12)
        step_id = wire.check_id("step id", step_id) if step_id is not None else task_type
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        start = schedules.start_time(start_at, delay, time.time())
        if start is not None:
            if target is not None or colocate_with is not None or soft:
                raise ConfigurationError(
                    "a delayed task cannot be targeted (no target, colocate_with or soft)"
                )
            self._require_schedules()
        when = _deadline(deadline, start)
        placement = await self._placement(
            task_type, group, run_id, key=key, target=target, colocate_with=colocate_with, soft=soft
        )
        message_headers = _extra_headers(headers)
        try:
            payload = encode(input)
        except Exception as exc:
            raise ConfigurationError(f"cannot encode the input for {task_type!r}: {exc}") from None
        reply_subject, slot = self.nc.expect_reply()
        message_headers[wire.H_MSG_ID] = wire.task_msg_id(task_type, run_id, step_id)
        message_headers[wire.H_SUBMITTED] = repr(time.time())
        message_headers[wire.H_REPLY] = reply_subject
        if retry is not None:
            message_headers[wire.H_RETRY] = retry.to_json()
        if when is not None:
            message_headers[wire.H_DEADLINE] = repr(when)
        subject = wire.task_subject(task_type, group, run_id, step_id, placement)
        if start is None:
            ack = await self.js.publish(subject, payload, headers=message_headers)
        else:
            if placement is not None and placement[0] == "p":
                # Fired into the plain subject, the workers move it into its key's
                # partition then: the partition count may change while it waits.
                subject = wire.task_subject(task_type, group, run_id, step_id)
                if key is not None:
                    message_headers[wire.H_KEY] = _key_header(key)
            # A one-shot schedule of its own (one on the same subject would replace it),
            # keeping the task's Nats-Msg-Id: submits dedupe as for any task.
            message_headers.update(schedules.delayed_headers(start, subject))
            ack = await self._publish_schedule(
                wire.delayed_subject(task_type, group, run_id, step_id), payload, message_headers
            )
        if placement is not None and placement[0] in "ts":
            await self._ensure_claim_consumer(task_type, group, placement)
        duplicate = bool(ack.get("duplicate"))
        return TaskHandle(
            self,
            task_type,
            run_id,
            step_id,
            group=group,
            seq=int(ack["seq"]),
            duplicate=duplicate,
            # A duplicate runs nothing new, so no reply will come: read the events instead.
            slot=None if duplicate else slot,
        )

    async def partitions(self, task_type: str) -> int | None:
        """The partition count stored for ``task_type``, or None when it is not partitioned.

        A count is kept for :attr:`PARTITIONS_REFRESH` seconds (it changes only while no
        worker of the type runs, see docs/routing.md); the absence of one is looked up
        again after :attr:`PARTITIONS_RECHECK` seconds.
        """
        wire.check_name("task type", task_type)
        cached = self._partitions.get(task_type)
        now = trio.current_time()
        if cached is not None and now < cached[1]:
            return cached[0]
        count = await stored_partitions(self.nc, task_type)
        keep = self.PARTITIONS_RECHECK if count is None else self.PARTITIONS_REFRESH
        self._partitions[task_type] = (count, now + keep)
        return count

    async def _placement(
        self,
        task_type: str,
        group: str,
        run_id: str,
        *,
        key: str | None,
        target: str | None,
        colocate_with: TaskHandle | None,
        soft: bool,
    ) -> str | None:
        if not isinstance(soft, bool):
            raise ConfigurationError(f"soft must be True or False, got {soft!r}")
        if soft and target is None and colocate_with is None:
            raise ConfigurationError("soft applies to a target: give target or colocate_with")
        if key is not None and (not isinstance(key, str) or not key or not _encodable(key)):
            raise ConfigurationError(f"key must be a non-empty str of valid Unicode, got {key!r}")
        if colocate_with is not None:
            if target is not None:
                raise ConfigurationError("give target or colocate_with, not both")
            if not isinstance(colocate_with, TaskHandle):
                raise ConfigurationError(
                    f"colocate_with must be a TaskHandle, got {colocate_with!r}"
                )
            target = await colocate_with.worker_target()
        if target is not None:
            target = check_claim(target)
        partitions = await self.partitions(task_type)
        if partitions is not None:
            if target is not None:
                raise ConfigurationError(
                    f"task type {task_type!r} is partitioned: its tasks go by key, not to a target"
                )
            return wire.partition_placement(
                partition_of(run_id if key is None else key, partitions)
            )
        if key is not None:
            raise ConfigurationError(
                f"task type {task_type!r} is not partitioned (no partition count is stored): "
                "a key means nothing for it; provision(partitions=...) or start a "
                "partitioned worker first"
            )
        if target is None:
            return None
        return wire.claim_placement(target, soft=soft)

    async def _ensure_claim_consumer(self, task_type: str, group: str, placement: str) -> None:
        # Made (when missing) after the task is stored, so that a worker's sweep deleting
        # the consumer as unused meanwhile finds the task when it looks again afterwards
        # and makes it anew (ClaimCoordinator.sweep). From then on the task is visible,
        # waiting for its claim, and a soft one can be taken over.
        config = wire.consumer_config(task_type, group, 30.0, placement=placement)
        try:
            await self.js.consumer_info(wire.TASK_STREAM, config["durable_name"])
        except JetStreamError as exc:
            if exc.err_code != CONSUMER_NOT_FOUND:
                raise
            await self.js.ensure_consumer(wire.TASK_STREAM, config)

    def stream(self, run_id: str, step_id: str) -> StepStream:
        """The streamed output of a step, until the step ends (see :class:`StepStream`)."""
        wire.check_id("run id", run_id)
        wire.check_id("step id", step_id)
        return StepStream(self, run_id, step_id)

    async def send_signal(self, run_id: str, name: str, data: Any = b"") -> None:
        """Send signal ``name`` with ``data`` (bytes or a JSON-able value) to run ``run_id``.

        A step waiting in ``ctx.wait_for_signal(name, ...)`` wakes with the data; one that
        starts waiting later gets it at once.
        """
        wire.check_id("run id", run_id)
        wire.check_name("signal name", name)
        await StepState(self.nc).send_signal(run_id, name, encode(data))

    async def schedule(
        self,
        task_type: str,
        input: Any = b"",
        *,
        schedule_id: str,
        every: float | timedelta | None = None,
        cron: str | None = None,
        time_zone: str | None = None,
        group: str | None = None,
        step_id: str | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Schedule:
        """Create or replace the recurring schedule ``schedule_id`` (docs/schedules.md).

        The server submits ``task_type`` with ``input`` in ``group`` every ``every``
        (a timedelta or seconds, whole and >= 1) or by ``cron`` (6 fields, seconds first:
        ``"0 */5 * * * *"``, or ``@hourly`` and the like), read in ``time_zone`` (an IANA
        name; cron only; UTC by default). Each firing is a run of its own, with the run id
        ``<schedule_id>=<the firing's stream timestamp in ns>`` and step id ``step_id``
        (default: the task type); ``retry`` and ``headers`` go with every firing.
        Schedule ids are run ids of at most 100 characters, one schedule each, whatever
        its task type: scheduling an id again replaces the schedule, and one identical to
        the stored schedule leaves it as it is. Raises ConfigurationError for invalid
        options, NatrioError without message schedules (nats-server 2.12 or later).
        """
        wire.check_name("task type", task_type)
        group = wire.check_name("group", group) if group is not None else wire.DEFAULT_GROUP
        schedule_id = schedules.check_schedule_id(schedule_id)
        step_id = wire.check_id("step id", step_id) if step_id is not None else task_type
        spec, zone = schedules.recurring_spec(every, cron, time_zone)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        message_headers = _extra_headers(headers)
        try:
            payload = encode(input)
        except Exception as exc:
            raise ConfigurationError(f"cannot encode the input for {task_type!r}: {exc}") from None
        if retry is not None:
            message_headers[wire.H_RETRY] = retry.to_json()
        target = wire.task_subject(task_type, group, schedule_id, step_id)
        message_headers.update(schedules.recurring_headers(spec, zone, target))
        self._require_schedules()
        subject = wire.schedule_subject(task_type, group, schedule_id)
        stored = await self._schedule_messages(schedule_id)
        current = stored.pop(subject, None)
        if current is None or not schedules.same_schedule(
            current.data, current.headers or {}, payload, message_headers
        ):
            await self._publish_schedule(subject, payload, message_headers)
        for other in stored:  # the same id under another task type or group
            await self._purge(other)
        return Schedule(schedule_id, task_type, group, step_id, spec, zone)

    async def schedules(self) -> list[Schedule]:
        """Every recurring schedule in the task stream, by schedule id (messages on the
        schedule subjects that are not natrio's schedules are left out)."""
        found = [
            schedules.read_schedule(subject, msg.headers or {})
            for subject, msg in (await self._schedule_messages(None)).items()
        ]
        return sorted((s for s in found if s is not None), key=lambda s: s.schedule_id)

    async def cancel_schedule(self, schedule_id: str) -> bool:
        """Remove the recurring schedule ``schedule_id``; False when there was none.

        A firing stored before is a task like any other and still runs.
        """
        schedule_id = schedules.check_schedule_id(schedule_id)
        return await self._purge(wire.schedule_subject("*", "*", schedule_id))

    async def trigger(self, schedule_id: str) -> TaskHandle:
        """Run the recurring schedule ``schedule_id`` now, once, and keep it as it is.

        The run is a task submitted with the schedule's task type, group, step id, input,
        retry policy and headers, and the run id ``<schedule_id>=<now in ns>`` (the form of
        a firing's); its handle is returned. Raises NatrioError when there is no such
        schedule.
        """
        schedule_id = schedules.check_schedule_id(schedule_id)
        for subject, msg in sorted((await self._schedule_messages(schedule_id)).items()):
            found = schedules.read_schedule(subject, msg.headers or {})
            if found is not None:
                break
        else:
            raise NatrioError(f"there is no schedule {schedule_id!r}")
        own, retry_text = schedules.trigger_headers(msg.headers or {})
        try:
            retry = None if retry_text is None else RetryPolicy.from_json(retry_text)
            # Submitted anew rather than by the server's run-now (a publish to the target
            # with Nats-Schedule-Next: purge), which would cancel the schedule.
            return await self.submit(
                found.task_type,
                msg.data,
                run_id=schedules.firing_run_id(schedule_id, time.time_ns()),
                step_id=found.step_id,
                group=found.group,
                retry=retry,
                headers=own,
            )
        except ConfigurationError as exc:
            # Read from the stream, where anyone may have written it.
            raise NatrioError(f"schedule {schedule_id!r} cannot be run: {exc}") from None

    def _require_schedules(self) -> None:
        schedules.require_schedules(self.nc.server_version)

    async def _publish_schedule(
        self, subject: str, payload: bytes, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        not_enabled = (
            f"the {wire.TASK_STREAM} stream does not hold message schedules: run "
            "natrio.provision() to enable them (nats-server 2.12 or later)"
        )
        try:
            return await self.js.publish(subject, payload, headers=headers)
        except NoResponders:
            raise NatrioError(f"{not_enabled} (no stream holds {subject})") from None
        except JetStreamError as exc:
            if exc.err_code == schedules.SCHEDULES_DISABLED:
                raise NatrioError(not_enabled) from None
            if exc.err_code in (schedules.PATTERN_INVALID, schedules.TIME_ZONE_INVALID):
                # Checked here already; the server's cron also refuses what never fires
                # (a 30th of February).
                raise ConfigurationError(
                    f"the server refuses the schedule {headers.get(wire.H_SCHEDULE)!r}: "
                    f"{exc.description}"
                ) from None
            raise

    async def _schedule_messages(self, schedule_id: str | None) -> dict[str, Message]:
        # The stored schedule messages (of one id, or all), by subject. All are read in
        # one batched get; one id's (most often one subject) by subject, which
        # permissions can scope to schedule subjects.
        pattern = (
            f"{wire.PREFIX}.schedule.>"
            if schedule_id is None
            else wire.schedule_subject("*", "*", schedule_id)
        )
        messages = None
        if schedule_id is None:
            messages = await self.js.last_messages(wire.TASK_STREAM, pattern)
        if messages is None:  # one id, an older server, or too many: one at a time
            messages = []
            for subject in await self.js.subjects(wire.TASK_STREAM, pattern):
                if not schedules.valid_schedule_subject(subject):
                    continue  # not natrio's, and maybe not a subject to publish a get for
                msg = await self.js.last_message(wire.TASK_STREAM, subject)
                if msg is not None:
                    messages.append(msg)
        found = {server_header(msg, "Nats-Subject"): msg for msg in messages}
        return {k: v for k, v in found.items() if schedules.valid_schedule_subject(k)}

    async def _purge(self, subjects: str) -> bool:
        reply = await self.js.api(f"STREAM.PURGE.{wire.TASK_STREAM}", {"filter": subjects})
        return bool(reply.get("purged"))

    def handle(self, task_type: str, run_id: str, step_id: str) -> TaskHandle:
        """A handle for a task submitted elsewhere (another process, an earlier run)."""
        wire.check_name("task type", task_type)
        wire.check_id("run id", run_id)
        wire.check_id("step id", step_id)
        return TaskHandle(self, task_type, run_id, step_id)

    async def _stored_outcome(self, handle: TaskHandle) -> Message | None:
        found: list[tuple[int, Message]] = []
        for kind in (wire.COMPLETED, wire.DEAD):
            msg = await self.js.last_message(
                wire.EVENT_STREAM,
                wire.event_subject(handle.task_type, handle.run_id, handle.step_id, kind),
            )
            if msg is None:
                continue
            # An outcome of an earlier task of the same step (submitted again after the
            # duplicate window) is not this task's: agent-loop iterations only come later.
            task_seq = wire.decimal(msg.header(wire.H_TASK_SEQ))
            if task_seq is None or (handle.seq is not None and task_seq < handle.seq):
                continue  # anyone may publish an event: one without a readable seq is not it
            stream_seq = wire.decimal(server_header(msg, "Nats-Sequence"))
            found.append((stream_seq or 0, msg))
        return max(found, key=lambda item: item[0])[1] if found else None

    async def history(
        self, run_id: str, step_id: str | None = None, *, limit: int = DEFAULT_LIMIT
    ) -> RunHistory:
        """The events of run ``run_id`` (of its step ``step_id`` only, when given), oldest
        first, whatever their task types: a :class:`RunHistory` of :class:`RunEvent`.

        Read from the events stream, so it covers the stream's retention
        (``events_max_age``). Messages under the run's event subjects that are not valid
        natrio events are skipped and counted; at most ``limit`` messages are read.
        """
        wire.check_id("run id", run_id)
        if step_id is not None:
            wire.check_id("step id", step_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, got {limit!r}")
        return await read_history(self.js, run_id, step_id, limit=limit)

    async def overview(self, *, window: float = 60.0) -> Overview:
        """What the deployment is doing now, read from the server (see :class:`Overview`):
        per task type and group, tasks pending, in flight, redelivered and dead-lettered;
        per task type, the outcomes recorded in the last ``window`` seconds."""
        return await read_overview(self.js, window=window)

    def dead_letters(
        self, task_type: str | None = None, group: str | None = None
    ) -> DeadLetterReader:
        """The dead-letter entries, oldest first, optionally of one task type and/or group:
        ``async for entry in client.dead_letters("resize"): ...``.

        Read a page at a time (see :class:`DeadLetterReader`), each entry with its
        sequence in the dead-letter stream (``entry.seq``, what :meth:`replay` takes).
        Messages there that are not valid entries are skipped with a warning.
        """
        return DeadLetterReader(self.js, _dead_filter(task_type, group))

    async def dead_letter(self, seq: int) -> DeadLetter | None:
        """The dead-letter entry with sequence ``seq`` in the dead-letter stream, or None
        when there is none (replayed, purged or expired); NatrioError for a message there
        that is not a valid entry."""
        return await entry_at(self.js, _dead_seq(seq))

    async def dead_letter_input(self, entry: DeadLetter) -> bytes:
        """The original input of a dead-lettered task, wherever the entry keeps it.

        Inline for most entries; for an input too large to sit beside its entry, read
        from the ``natrio_dead_inputs`` object store (``entry.input_ref``, which must be
        ``dlq-<task_seq>``). Raises NatrioError when the stored object is gone (it expired
        with its stream), damaged, or another entry's.
        """
        return await read_input(self.js, entry)

    async def replay(
        self,
        dead_letter: DeadLetter | int,
        *,
        input: Any = None,
        deadline: float | timedelta | datetime | None = None,
    ) -> TaskHandle:
        """Submit a dead-lettered task again, with a fresh attempt budget, and return its
        handle; the entry leaves the dead-letter stream once the new task is stored.

        ``dead_letter`` is an entry from :meth:`dead_letters` or its ``seq``. The task
        keeps its task type, group, run id and step id, its placement (partition or
        claim), the headers its submitter set, its retry policy and its agent-loop
        iteration; its input is the original one (inline in the entry or in the object
        store), or ``input`` (bytes or a value cattrs can unstructure; pass ``b""`` for
        an empty one). Its deadline is not kept (it would dead-letter the replay again):
        ``deadline`` sets a new one, as in :meth:`submit`.

        The replay's message id is made from the entry, and a step with a task newer
        than the one that died (in the task stream, or with events) is not submitted
        again: replaying one entry twice, or after a crash between the store and the
        removal, makes one task (the handle of the second has ``duplicate`` set, and
        follows that task). The entry is removed only by a replay that stored its task
        (or that the task stream took for a duplicate of a stored one); one replayed
        already stays, as does one that cannot be removed (both are logged). Raises
        NatrioError when the entry is gone (replayed, purged or expired) or is not a
        valid entry.
        """
        seq = _dead_seq(dead_letter.seq if isinstance(dead_letter, DeadLetter) else dead_letter)
        when = _deadline(deadline)
        payload: bytes | None = None
        if input is not None:
            try:
                payload = encode(input)
            except Exception as exc:
                raise ConfigurationError(f"cannot encode the replay's input: {exc}") from None
        entry = await entry_at(self.js, seq)
        if entry is None:
            raise NatrioError(
                f"dead letter {seq} is not in {wire.DEAD_STREAM}: replayed or purged "
                "already, or expired"
            )
        if isinstance(dead_letter, DeadLetter) and _identity(dead_letter) != _identity(entry):
            raise NatrioError(f"dead letter {seq} in {wire.DEAD_STREAM} is another step's")
        headers, dropped = replay_headers(entry)
        warn_dropped(entry, dropped)
        slot: Reply | None = None
        newer = await newer_task(self.js, entry)
        if newer is not None:
            # Replayed already (or submitted again): that task is this entry's replay. The
            # entry stays: anyone may publish tasks and events, and this call stored nothing.
            task_seq, duplicate = newer, True
            warn_kept(entry, newer)
        else:
            if payload is None:
                payload = await self.dead_letter_input(entry)
            placement = replay_placement(
                entry, await self.partitions(entry.task_type), headers.get(wire.H_KEY)
            )
            reply_subject, slot = self.nc.expect_reply()
            headers[wire.H_MSG_ID] = wire.replay_msg_id(
                entry.task_type, entry.run_id, entry.step_id, seq
            )
            headers[wire.H_SUBMITTED] = repr(time.time())
            headers[wire.H_REPLY] = reply_subject
            if when is not None:
                headers[wire.H_DEADLINE] = repr(when)
            ack = await self.js.publish(
                wire.task_subject(
                    entry.task_type, entry.group, entry.run_id, entry.step_id, placement
                ),
                payload,
                headers=headers,
            )
            task_seq, duplicate = int(ack["seq"]), bool(ack.get("duplicate"))
            if duplicate:
                # Stored already under the replay's id (a replay at the same moment).
                await check_duplicate(self.js, entry, task_seq)
            if placement is not None and placement[0] in "ts":
                await self._ensure_claim_consumer(entry.task_type, entry.group, placement)
            # Only now, with the replay stored: a failure before leaves the entry as it was.
            await settle_replayed(self.js, entry, task_seq)
        return TaskHandle(
            self,
            entry.task_type,
            entry.run_id,
            entry.step_id,
            group=entry.group,
            seq=task_seq,
            duplicate=duplicate,
            # A duplicate runs nothing new, so no reply will come: read the events instead.
            slot=None if duplicate else slot,
        )

    async def purge_dead_letters(
        self, task_type: str | None = None, group: str | None = None
    ) -> int:
        """Remove the dead letters of one task type and/or group (without either, every
        message of the dead-letter stream) and their inputs kept in the object store;
        returns how many messages were removed, ones that are not valid entries included.
        Entries that arrive while it runs stay."""
        return await purge(self.js, _dead_filter(task_type, group))


def _dead_filter(task_type: str | None, group: str | None) -> str:
    if task_type is not None:
        wire.check_name("task type", task_type)
    if group is not None:
        wire.check_name("group", group)
    return wire.dead_filter(task_type, group)


def _dead_seq(seq: object) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ConfigurationError(
            f"a dead letter is named by its seq in the dead-letter stream (an int >= 1, as "
            f"DeadLetter.seq of an entry from Client.dead_letters), got {seq!r}"
        )
    return seq


def _identity(entry: DeadLetter) -> tuple[str, str, str, str, int]:
    return (entry.task_type, entry.group, entry.run_id, entry.step_id, entry.task_seq)


def _key_header(key: str) -> str:
    # What the wire edge accepts as a Natrio-Key.
    if len(key) > wire.MAX_KEY or "\r" in key or "\n" in key:
        raise ConfigurationError(
            f"a delayed task's key travels in a header: at most {wire.MAX_KEY} characters, one line"
        )
    return key
