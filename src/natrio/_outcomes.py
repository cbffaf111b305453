"""Outcome publishing: events, replies to waiting clients, dead letters, and the acks that follow.

Every terminal outcome is made durable before the task message is acknowledged: the
completion (or dead) event is published with a ``Nats-Msg-Id`` derived from the step and
the task's stream sequence, and awaited, and only then is ``+ACK`` (or ``+TERM``) sent.
A crash between the two leads to a redelivery whose event the stream drops as a
duplicate, and which the dispatcher recognises before running the handler again.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import traceback as tb
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import trio

from . import _wire as wire
from ._asyncio.bridge import Connection, Headers, Message
from ._errors import ConnectionClosed, Fatal, NatrioError, NoResponders, RequestTimeout, Retryable
from ._jetstream import JetStream
from ._retry import RetryPolicy

log = logging.getLogger("natrio.outcomes")

_NS = 1_000_000_000


@attrs.frozen
class Task:
    """One delivery of a task, as read off the wire. Frozen: middleware and hooks get this value.

    ``attempt`` is 1-based and counts deliveries (from the ack subject) less pauses;
    ``delivered`` is the raw delivery count; ``seq`` is the task's sequence in the task
    stream; ``deadline`` is a Unix time or None; ``retry`` is the policy sent with the
    task, if any; ``reply`` the subject a waiting client listens on, if any;
    ``iteration`` counts agent-loop iterations from 1; ``resumed`` is true on the first
    delivery after a pause.
    """

    task_type: str
    group: str
    run_id: str
    step_id: str
    input: bytes
    headers: Mapping[str, str]
    attempt: int
    seq: int
    deadline: float | None = None
    retry: RetryPolicy | None = None
    reply: str | None = None
    iteration: int = 1
    resumed: bool = False
    delivered: int = 0

    @property
    def retry_count(self) -> int:
        """Retries before this attempt (0-based)."""
        return self.attempt - 1


@attrs.frozen
class TaskError:
    """Why a task attempt failed: exception type, message, traceback, and a kind.

    Kinds: ``error`` (an exception, retried per policy), ``fatal`` (no retries wanted),
    ``exhausted`` (the last allowed attempt failed), ``decode`` (the input could not be
    decoded), ``malformed`` (the message itself is not a valid task), ``timeout`` (the
    handler's timeout expired), ``deadline`` (the task's deadline passed), ``iterations``
    (an agent loop reached ``max_iterations``).
    """

    type: str
    message: str
    traceback: str = ""
    kind: str = "error"
    attempts: int = 0

    @classmethod
    def from_exception(cls, exc: BaseException, *, kind: str, attempts: int) -> TaskError:
        """Describe ``exc``; a Fatal or Retryable wrapping another exception describes that one."""
        shown: BaseException = exc
        if isinstance(exc, Fatal | Retryable) and isinstance(exc.reason, BaseException):
            shown = exc.reason
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(shown).__name__, str(shown), text, kind, attempts)

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready data."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskError:
        """Read an error written by :meth:`to_dict`."""
        return cls(
            type=str(data.get("type", "")),
            message=str(data.get("message", "")),
            traceback=str(data.get("traceback", "")),
            kind=str(data.get("kind", "error")),
            attempts=int(data.get("attempts", 0)),
        )


@attrs.frozen
class DeadLetter:
    """A dead-letter entry: the original task, why it died, where and when."""

    task_type: str
    group: str
    run_id: str
    step_id: str
    subject: str
    input: bytes
    headers: Mapping[str, str]
    error: TaskError
    attempts: int
    worker_id: str
    time: str
    task_seq: int = 0

    def to_json(self) -> bytes:
        """The entry as stored in the dead-letter stream."""
        data = attrs.asdict(self, recurse=False)
        data["input"] = base64.b64encode(self.input).decode()
        data["headers"] = dict(self.headers)
        data["error"] = self.error.to_dict()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeadLetter:
        """Read an entry written by :meth:`to_json`."""
        data = json.loads(raw)
        data["input"] = base64.b64decode(data["input"])
        data["error"] = TaskError.from_dict(data["error"])
        return cls(**data)


def now_iso() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat()


class Reporter:
    """Publishes outcomes for one worker and sends the acks that follow them."""

    def __init__(self, conn: Connection, worker_id: str, *, publish_timeout: float = 2.0) -> None:
        self.conn = conn
        self.js = JetStream(conn, timeout=publish_timeout)
        self.worker_id = worker_id
        # How long to keep retrying a durable publish (server restarting, leader moving)
        # before leaving the task to be redelivered.
        self.durable_patience = 30.0
        # Set by a shutdown that has run out of grace: no retrying past it.
        self.hard_deadline = math.inf

    # -- acks -------------------------------------------------------------------------

    def ack(self, msg: Message) -> None:
        """Acknowledge: the task is done and leaves the work queue."""
        self.conn.publish_nowait(msg.reply, b"+ACK")

    def nak(self, msg: Message, delay: float = 0.0) -> None:
        """Negative ack: redeliver, at once or after ``delay`` seconds."""
        payload = b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * _NS)
        self.conn.publish_nowait(msg.reply, payload)

    def term(self, msg: Message) -> None:
        """Terminate: never redeliver."""
        self.conn.publish_nowait(msg.reply, b"+TERM")

    def in_progress(self, msg: Message) -> None:
        """Reset the ack timer (``+WPI``)."""
        self.conn.publish_nowait(msg.reply, b"+WPI")

    # -- events -----------------------------------------------------------------------

    def _headers(self, task: Task, **extra: str) -> dict[str, str]:
        return {
            wire.H_TASK_SEQ: str(task.seq),
            wire.H_ATTEMPT: str(task.attempt),
            wire.H_WORKER: self.worker_id,
            **extra,
        }

    def started(self, task: Task) -> None:
        """Publish a ``started`` event (not awaited: it carries no promise)."""
        self.conn.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.STARTED),
            b"",
            headers=Headers.of_own(self._headers(task)),
        )

    async def _publish_durably(
        self, subject: str, payload: bytes, headers: Mapping[str, str]
    ) -> None:
        # The same Nats-Msg-Id makes every retry idempotent, so retry through reconnects.
        deadline = trio.current_time() + self.durable_patience
        delay = 0.05
        while True:
            deadline = min(deadline, self.hard_deadline)
            try:
                await self.js.publish(subject, payload, headers=headers)
                return
            except (RequestTimeout, ConnectionClosed, NoResponders) as exc:
                # Transient: reconnecting, a leader election. Anything else (a payload over
                # the limit, a stream limit) will not get better by waiting.
                if isinstance(exc, ConnectionClosed) and self.conn.closed:
                    raise
                if trio.current_time() + delay > deadline:
                    raise
                log.debug("publishing %s failed (%r); retrying", subject, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _completion_headers(self, task: Task) -> Headers:
        # Encoded once: the reply to a waiting client carries the same headers.
        return Headers.of_own(
            self._headers(
                task,
                **{
                    wire.H_MSG_ID: wire.outcome_msg_id(
                        "c", task.task_type, task.run_id, task.step_id, task.seq
                    ),
                    wire.H_OUTCOME: wire.COMPLETED,
                },
            )
        )

    async def completed(self, task: Task, output: bytes) -> Headers:
        """Record the completion durably; returns the headers to :meth:`announce` it with."""
        headers = self._completion_headers(task)
        await self._publish_durably(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.COMPLETED),
            output,
            headers,
        )
        return headers

    def completed_nowait(
        self,
        task: Task,
        output: bytes,
        on_stored: Callable[[Headers, NatrioError | None], None],
    ) -> None:
        """Publish the completion without waiting: ``on_stored(headers, error)`` is called once
        the stream has stored it (error None) or could not (then record it with
        :meth:`completed`, which retries)."""
        headers = self._completion_headers(task)
        self.js.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.COMPLETED),
            output,
            headers=headers,
            on_ack=lambda _ack, error: on_stored(headers, error),
        )

    def announce(self, task: Task, payload: bytes, headers: Mapping[str, str]) -> None:
        """Tell a waiting client the outcome (after the ack)."""
        if task.reply:
            self.conn.publish_nowait(task.reply, payload, headers=headers)

    def paused(self, task: Task, delay: float) -> None:
        """Publish a ``paused`` event (not awaited)."""
        self.conn.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.PAUSED),
            json.dumps({"delay": delay}).encode(),
            headers=self._headers(task),
        )

    async def continued(self, task: Task, msg: Message, next_input: bytes) -> None:
        """Enqueue the step's next iteration (once, even if this runs twice), record it, ack."""
        headers = {
            k: v for k, v in task.headers.items() if not k.startswith("Nats-") or k == wire.H_MSG_ID
        }
        headers[wire.H_MSG_ID] = wire.task_msg_id(
            task.task_type, task.run_id, task.step_id, task.iteration + 1
        )
        headers[wire.H_ITERATION] = str(task.iteration + 1)
        await self._publish_durably(msg.subject, next_input, headers)
        await self._publish_durably(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.CONTINUED),
            next_input,
            self._headers(
                task,
                **{
                    wire.H_MSG_ID: wire.outcome_msg_id(
                        "k", task.task_type, task.run_id, task.step_id, task.seq
                    ),
                    wire.H_ITERATION: str(task.iteration),
                },
            ),
        )
        self.ack(msg)

    def failed(self, task: Task, msg: Message, error: TaskError, delay: float) -> None:
        """Record a failed attempt that will be retried, and NAK it with the retry delay."""
        payload = json.dumps(error.to_dict() | {"retry_in": delay}).encode()
        self.conn.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.FAILED),
            payload,
            headers=self._headers(task),
        )
        self.nak(msg, delay)

    async def dead(
        self, task: Task, msg: Message, error: TaskError
    ) -> tuple[bytes, dict[str, str]]:
        """Write the dead-letter entry and the ``dead`` event; returns the payload and headers
        to :meth:`announce` it with."""
        entry = DeadLetter(
            task_type=task.task_type,
            group=task.group,
            run_id=task.run_id,
            step_id=task.step_id,
            subject=msg.subject,
            input=task.input,
            headers=dict(task.headers),
            error=error,
            attempts=task.attempt,
            worker_id=self.worker_id,
            time=now_iso(),
            task_seq=task.seq,
        )
        await self.dead_letter(entry, msg)
        payload = json.dumps(error.to_dict()).encode()
        headers = self._headers(
            task,
            **{
                wire.H_MSG_ID: wire.outcome_msg_id(
                    "d", task.task_type, task.run_id, task.step_id, task.seq
                ),
                wire.H_OUTCOME: wire.DEAD,
            },
        )
        await self._publish_durably(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.DEAD),
            payload,
            headers,
        )
        return payload, headers

    async def dead_letter(self, entry: DeadLetter, msg: Message) -> None:
        """Store a dead-letter entry (deduplicated per task message)."""
        await self._publish_durably(
            wire.dead_subject(entry.task_type, entry.group, entry.run_id, entry.step_id),
            entry.to_json(),
            {wire.H_MSG_ID: f"dlq:{entry.task_seq}"} if entry.task_seq else {},
        )

    async def malformed(self, msg: Message, reason: str) -> None:
        """Dead-letter a message that is not a valid task, and terminate it."""
        parsed = wire.parse_task_subject(msg.subject)
        tokens = msg.subject.split(".")
        task_type = parsed[0] if parsed else (tokens[2] if len(tokens) > 2 else "unknown")
        group = parsed[1] if parsed else (tokens[3] if len(tokens) > 3 else "unknown")
        try:
            attempts, seq = wire.parse_ack_subject(msg.reply)
        except ValueError:
            attempts, seq = 1, 0
        entry = DeadLetter(
            task_type=task_type,
            group=group,
            run_id=parsed[2] if parsed else "malformed",
            step_id=parsed[3] if parsed else str(seq),
            subject=msg.subject,
            input=msg.data,
            headers=dict(msg.headers or {}),
            error=TaskError("MalformedTask", reason, "", "malformed", attempts),
            attempts=attempts,
            worker_id=self.worker_id,
            time=now_iso(),
            task_seq=seq,
        )
        await self.dead_letter(entry, msg)
        self.term(msg)

    async def finish_if_done(self, task: Task, msg: Message) -> bool:
        """If this very task message already completed, continued or died (a redelivery
        after a crash between recording that and the ack or TERM), tell a waiting client
        again, settle the message the same way, and return True."""
        for kind in (wire.COMPLETED, wire.CONTINUED, wire.DEAD):
            last = await self.js.last_message(
                wire.EVENT_STREAM,
                wire.event_subject(task.task_type, task.run_id, task.step_id, kind),
            )
            if last is None or last.header(wire.H_TASK_SEQ) != str(task.seq):
                continue
            if kind == wire.DEAD:
                self.term(msg)  # dead-lettered already; only the TERM was lost
                return True
            if kind == wire.COMPLETED and task.reply:
                self.conn.publish_nowait(
                    task.reply,
                    last.data,
                    headers={wire.H_OUTCOME: wire.COMPLETED, wire.H_TASK_SEQ: str(task.seq)},
                )
            self.ack(msg)
            return True
        return False
