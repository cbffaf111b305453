"""The client: submit tasks, await their results, read dead letters."""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

import trio

from . import _wire as wire
from ._codec import decode, encode
from ._errors import ConfigurationError, JetStreamError, NatrioError, TaskFailed
from ._jetstream import CONSUMER_NOT_FOUND, JetStream
from ._model import DeadLetter, TaskError
from ._objects import ObjectStore
from ._retry import RetryPolicy
from ._routing.partitions import stored_partitions
from ._routing.placement import check_claim, partition_of, worker_target
from ._state import StepState
from ._transport import Connection, Message, Reply, Subscription
from ._transport.protocol import valid_header_name

T = TypeVar("T")


def _deadline(value: float | timedelta | datetime | None) -> float | None:
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
    return time.time() + float(seconds)


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
    events stream, in case the worker's direct reply was lost.
    """

    #: Seconds after which a task type found unpartitioned is looked up again.
    PARTITIONS_RECHECK = 2.0
    #: Seconds after which a stored partition count is read again.
    PARTITIONS_REFRESH = 30.0

    def __init__(
        self, nc: Connection, *, timeout: float = 5.0, check_interval: float = 5.0
    ) -> None:
        self.nc = nc
        self.js = JetStream(nc, timeout=timeout)
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
        """
        wire.check_name("task type", task_type)
        group = wire.check_name("group", group) if group is not None else wire.DEFAULT_GROUP
        run_id = wire.check_id("run id", run_id) if run_id is not None else secrets.token_hex(12)
        step_id = wire.check_id("step id", step_id) if step_id is not None else task_type
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        when = _deadline(deadline)
        placement = await self._placement(
            task_type, group, run_id, key=key, target=target, colocate_with=colocate_with, soft=soft
        )
        message_headers: dict[str, str] = {}
        for key, value in (headers or {}).items():
            if (
                not isinstance(key, str)
                or not isinstance(value, str)
                or not valid_header_name(key)
                or key.lower().startswith("natrio-")
                or "\r" in value
                or "\n" in value
            ):
                raise ConfigurationError(
                    "headers must map names (RFC 7230 tokens, not Natrio-*) to single-line "
                    f"strings, got {key!r}: {value!r}"
                )
            message_headers[key] = value
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
        ack = await self.js.publish(
            wire.task_subject(task_type, group, run_id, step_id, placement),
            payload,
            headers=message_headers,
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
            if handle.seq is not None and int(msg.header(wire.H_TASK_SEQ) or 0) < handle.seq:
                continue
            found.append((int(msg.header("Nats-Sequence") or 0), msg))
        return max(found, key=lambda item: item[0])[1] if found else None

    async def dead_letters(
        self, task_type: str | None = None, *, limit: int = 100
    ) -> list[DeadLetter]:
        """The most recent dead-letter entries (oldest first), optionally of one task type."""
        if task_type is not None:
            wire.check_name("task type", task_type)
        subject = f"{wire.PREFIX}.dead.{task_type or '*'}.>"
        subjects = await self.js.subjects(wire.DEAD_STREAM, subject)
        entries: list[DeadLetter] = []
        for name in subjects:
            msg = await self.js.last_message(wire.DEAD_STREAM, name)
            if msg is not None:
                entries.append(DeadLetter.from_json(msg.data))
        entries.sort(key=lambda e: e.time)
        return entries[-limit:]

    async def dead_letter_input(self, entry: DeadLetter) -> bytes:
        """The original input of a dead-lettered task, wherever the entry keeps it.

        Inline for most entries; for an input too large to sit beside its entry, read
        from the ``natrio_dead_inputs`` object store (``entry.input_ref``). Raises
        NatrioError when the stored object is gone (it expired with its stream).
        """
        if entry.input_ref is None:
            return entry.input
        data = await ObjectStore(self.js, wire.DEAD_INPUTS_BUCKET).get(entry.input_ref)
        if data is None:
            raise NatrioError(
                f"the input of dead letter {entry.task_seq} ({entry.input_ref}) is gone"
            )
        return data
