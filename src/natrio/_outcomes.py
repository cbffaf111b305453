"""Outcome publishing: events, replies to waiting clients and dead letters.

Every terminal outcome is made durable before the task message is settled: the completion
(or dead) event is published with a ``Nats-Msg-Id`` derived from the step and the task's
stream sequence, and awaited, and only then does the dispatcher send ``+ACK`` (or
``+TERM``). A crash between the two leads to a redelivery whose event the stream drops as
a duplicate, and which the dispatcher recognises before running the handler again.
Settling is the dispatcher's (one settlement per delivery); this module only publishes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import attrs
import trio

from . import _wire as wire
from ._errors import ConnectionClosed, NatrioError, NoResponders, RequestTimeout
from ._jetstream import JetStream
from ._model import DeadLetter, Task, TaskError, truncate
from ._objects import ObjectStore, dead_input_owner
from ._transport import Connection, Headers, Message

log = logging.getLogger("natrio.outcomes")

#: Room left in a message for what is not the payload (the publish's own headers).
HEADROOM = 1024
#: How much of a task's headers a dead-letter entry keeps inline.
MAX_DEAD_HEADERS = 16384


def now_iso() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat()


def shown_subject(subject: str) -> str:
    """A received subject as text fit to store: bytes that are not UTF-8 as ``\\x..``."""
    text = subject.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return truncate(text, 4096)


def bounded_headers(headers: Mapping[str, str], limit: int = MAX_DEAD_HEADERS) -> dict[str, str]:
    """``headers`` as a dead-letter entry keeps them, in about ``limit`` characters: those
    that could be published again (names RFC 7230 tokens of at most 256 characters, values
    one line, long ones shortened), natrio's own first; ``Natrio-Headers-Cut`` counts the
    headers left out (:meth:`DeadLetter.from_json` takes no others)."""
    ordered = sorted(headers.items(), key=lambda item: not item[0].startswith(("Natrio-", "Nats-")))
    out: dict[str, str] = {}
    used = 0
    for name, value in ordered:
        if len(name) > 256 or not wire.valid_header(name, value):
            continue  # a malformed task's: its error says what was wrong with it
        # On one line: truncate's marker has line breaks around it.
        value = truncate(value, 2048).replace("\n", " ")
        used += len(name) + len(value) + 8
        if used > limit:
            break
        out[name] = value
    if len(out) < len(headers):
        out["Natrio-Headers-Cut"] = str(len(headers) - len(out))
    return out


class Reporter:
    """Publishes the outcomes of one worker's tasks."""

    def __init__(self, conn: Connection, worker_id: str, *, publish_timeout: float = 2.0) -> None:
        self.conn = conn
        self.js = JetStream(conn, timeout=publish_timeout)
        self.dead_inputs = ObjectStore(self.js, wire.DEAD_INPUTS_BUCKET)
        self.worker_id = worker_id
        # How long to keep retrying a durable publish (server restarting, leader moving)
        # before leaving the task to be redelivered.
        self.durable_patience = 30.0
        # Set by a shutdown that has run out of grace: no retrying past it.
        self.hard_deadline = math.inf

    def fits(self, payload: bytes) -> bool:
        """Whether ``payload`` fits in one event beside natrio's headers."""
        return len(payload) + HEADROOM <= self.conn.max_payload

    # -- events -----------------------------------------------------------------------

    def _headers(self, task: Task, **extra: str) -> dict[str, str]:
        headers = {
            wire.H_TASK_SEQ: str(task.seq),
            wire.H_ATTEMPT: str(task.attempt),
            wire.H_WORKER: self.worker_id,
            **extra,
        }
        if task.started_at is not None:
            # Every event of an execution says when it began, so its history needs no
            # started event for the many tasks that end before one is sent.
            headers[wire.H_STARTED] = f"{task.started_at:.6f}"
        if task.iteration > 1:
            # Tells a redelivered earlier iteration that the loop has moved past it.
            headers.setdefault(wire.H_ITERATION, str(task.iteration))
        return headers

    def started(self, task: Task) -> None:
        """Publish a ``started`` event (not awaited: it carries no promise).

        The dispatcher sends it for executions still running after the worker's
        ``started_event_after``.
        """
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

    async def forward(self, task: Task, placement: str) -> None:
        """Store ``task`` again under ``placement`` (a partition), as it came (its headers
        were checked at the edge); redone after a crash, the copy is a duplicate."""
        # JetStream's own headers (expectations about the original's stream position, its
        # id) do not apply to the copy.
        headers = {k: v for k, v in task.headers.items() if not k.lower().startswith("nats-")}
        # One id per stored message: a redelivery of it forwards a duplicate.
        headers[wire.H_MSG_ID] = f"forward:{task.task_type}:{task.seq}"
        await self._publish_durably(
            wire.task_subject(task.task_type, task.group, task.run_id, task.step_id, placement),
            task.input,
            headers,
        )

    def completion_headers(self, task: Task) -> Headers:
        # Encoded once: the reply to a waiting client carries the same headers. Written
        # out in one format string rather than through _headers(): it runs once per task
        # (test_outcomes checks it against the general encoding).
        seq, attempt, worker = str(task.seq), str(task.attempt), self.worker_id
        msg_id = wire.outcome_msg_id("c", task.task_type, task.run_id, task.step_id, task.seq)
        items = {
            wire.H_TASK_SEQ: seq,
            wire.H_ATTEMPT: attempt,
            wire.H_WORKER: worker,
            wire.H_MSG_ID: msg_id,
            wire.H_OUTCOME: wire.COMPLETED,
        }
        started = ""
        if task.started_at is not None:
            items[wire.H_STARTED] = value = f"{task.started_at:.6f}"
            started = f"{wire.H_STARTED}: {value}\r\n"
        block = (
            f"NATS/1.0\r\n{wire.H_TASK_SEQ}: {seq}\r\n{wire.H_ATTEMPT}: {attempt}\r\n"
            f"{wire.H_WORKER}: {worker}\r\n{wire.H_MSG_ID}: {msg_id}\r\n"
            f"{wire.H_OUTCOME}: {wire.COMPLETED}\r\n{started}\r\n"
        )
        return Headers.of_own_block(items, block.encode())

    async def completed(self, task: Task, output: bytes) -> Headers:
        """Record the completion durably; returns the headers to :meth:`announce` it with."""
        headers = self.completion_headers(task)
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
        headers: Headers,
        on_stored: Callable[[NatrioError | None], None],
    ) -> None:
        """Publish the completion (with :meth:`completion_headers`) without waiting:
        ``on_stored(error)`` is called once the stream has stored it (error None) or could
        not (then record it with :meth:`completed`, which retries)."""
        self.js.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.COMPLETED),
            output,
            headers=headers,
            on_stored=on_stored,
            # A registered task type and ids the wire edge checked.
            subject_checked=True,
        )

    def announce(self, task: Task, payload: bytes, headers: Mapping[str, str]) -> None:
        """Tell a waiting client the outcome (after the settlement).

        ``task.reply`` is set only for reply subjects under the inbox prefix (the wire
        edge checks it), so a task cannot steer where a worker publishes.
        """
        if task.reply:
            self.conn.publish_nowait(task.reply, payload, headers=headers)

    def paused(self, task: Task, delay: float) -> None:
        """Publish a ``paused`` event (not awaited)."""
        self.conn.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.PAUSED),
            json.dumps({"delay": delay}).encode(),
            headers=self._headers(task),
        )

    @staticmethod
    def next_iteration_headers(task: Task) -> Headers:
        """The headers of the step's next iteration: the task's own, less JetStream's, with a
        new message id and iteration. Raises ValueError for one that cannot be published."""
        headers = {k: v for k, v in task.headers.items() if not k.startswith("Nats-")}
        headers[wire.H_MSG_ID] = wire.task_msg_id(
            task.task_type, task.run_id, task.step_id, task.iteration + 1
        )
        headers[wire.H_ITERATION] = str(task.iteration + 1)
        return Headers(headers)

    async def continued(
        self, task: Task, subject: str, next_input: bytes, headers: Headers | None = None
    ) -> None:
        """Enqueue the step's next iteration on ``subject`` (once, even if this runs twice)
        and record the ``continued`` event; the caller acks."""
        if headers is None:
            headers = self.next_iteration_headers(task)
        await self._publish_durably(subject, next_input, headers)
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

    def failed(self, task: Task, error: TaskError, delay: float) -> None:
        """Publish a ``failed`` event for an attempt that will be retried (not awaited)."""
        payload = json.dumps(error.to_dict() | {"retry_in": delay}).encode()
        self.conn.publish_nowait(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.FAILED),
            payload,
            headers=self._headers(task),
        )

    def _dead_headers(self, task: Task) -> dict[str, str]:
        return self._headers(
            task,
            **{
                wire.H_MSG_ID: wire.outcome_msg_id(
                    "d", task.task_type, task.run_id, task.step_id, task.seq
                ),
                wire.H_OUTCOME: wire.DEAD,
            },
        )

    async def dead(
        self, task: Task, subject: str, error: TaskError
    ) -> tuple[bytes, dict[str, str]]:
        """Write the dead-letter entry and the ``dead`` event; returns the payload and headers
        to :meth:`announce` it with."""
        entry = DeadLetter(
            task_type=task.task_type,
            group=task.group,
            run_id=task.run_id,
            step_id=task.step_id,
            subject=subject,
            input=task.input,
            headers=bounded_headers(task.headers),
            error=error,
            attempts=task.attempt,
            worker_id=self.worker_id,
            time=now_iso(),
            task_seq=task.seq,
        )
        await self.dead_letter(entry)
        payload = json.dumps(error.to_dict()).encode()
        headers = self._dead_headers(task)
        await self._publish_durably(
            wire.event_subject(task.task_type, task.run_id, task.step_id, wire.DEAD),
            payload,
            headers,
        )
        return payload, headers

    async def dead_letter(self, entry: DeadLetter) -> None:
        """Store a dead-letter entry (deduplicated per task message), always within one message.

        An input that does not fit beside the entry goes to the ``natrio_dead_inputs``
        object store first, and the entry refers to it.
        """
        raw = entry.to_json()
        if not self.fits(raw):
            name = wire.dead_input_name(entry.task_seq) if entry.task_seq else f"dlq-{now_iso()}"
            await self.dead_inputs.put(name, entry.input, owner=dead_input_owner(entry))
            entry = attrs.evolve(entry, input=b"", input_ref=name)
            raw = entry.to_json()
            if not self.fits(raw):
                # Only a server with a tiny max_payload gets here: keep what fits.
                error = attrs.evolve(
                    entry.error, traceback="", message=truncate(entry.error.message, 256)
                )
                entry = attrs.evolve(
                    entry, headers=bounded_headers(entry.headers, 1024), error=error
                )
                raw = entry.to_json()
        await self._publish_durably(
            wire.dead_subject(entry.task_type, entry.group, entry.run_id, entry.step_id),
            raw,
            {wire.H_MSG_ID: f"dlq:{entry.task_seq}"} if entry.task_seq else {},
        )

    async def malformed(
        self,
        msg: Message,
        reason: str,
        *,
        task_type: str,
        group: str,
        seq: int,
        attempts: int,
        ids: tuple[str, str] | None,
        reply: str | None,
    ) -> None:
        """Dead-letter a message that is not a valid task (the caller terminates it).

        The entry goes under the consumer's task type and group, with the message's run
        and step ids when those are valid (else ``malformed`` and ``seq<N>``); then the
        step gets a ``dead`` event and ``reply`` (a valid inbox subject, or None) an answer.
        """
        run_id, step_id = ids or ("malformed", f"seq{seq}")
        error = TaskError("MalformedTask", truncate(reason, 1024), "", "malformed", attempts)
        entry = DeadLetter(
            task_type=task_type,
            group=group,
            run_id=run_id,
            step_id=step_id,
            subject=shown_subject(msg.subject),
            input=msg.data,
            headers=bounded_headers(msg.headers or {}),
            error=error,
            attempts=attempts,
            worker_id=self.worker_id,
            time=now_iso(),
            task_seq=seq,
        )
        await self.dead_letter(entry)
        if ids is None:
            return
        task = Task(task_type, group, run_id, step_id, b"", {}, attempts, seq)
        payload = json.dumps(error.to_dict()).encode()
        headers = self._dead_headers(task)
        await self._publish_durably(
            wire.event_subject(task_type, run_id, step_id, wire.DEAD), payload, headers
        )
        if reply:
            self.conn.publish_nowait(reply, payload, headers=headers)

    async def finish_if_done(self, task: Task) -> str | None:
        """If this very task message already completed, continued or died (a redelivery
        after a crash between recording that and the settlement), tell a waiting client
        again and return how to settle it now (``"ack"`` or ``"term"``), else None.

        Only the step's last event of each kind is kept at hand, so an agent loop that
        went on after this iteration's settlement was lost shows a later iteration's
        event: that one proves this iteration continued (a later iteration exists only
        once an earlier one continued), and the stale message is acked without running.
        """
        for kind in (wire.COMPLETED, wire.CONTINUED, wire.DEAD):
            last = await self.js.last_message(
                wire.EVENT_STREAM,
                wire.event_subject(task.task_type, task.run_id, task.step_id, kind),
            )
            if last is None:
                continue
            if last.header(wire.H_TASK_SEQ) != str(task.seq):
                if later_iteration(last, task):
                    return "ack"
                continue
            if kind == wire.DEAD:
                return "term"  # dead-lettered already; only the TERM was lost
            if kind == wire.COMPLETED and task.reply:
                self.conn.publish_nowait(
                    task.reply,
                    last.data,
                    headers={wire.H_OUTCOME: wire.COMPLETED, wire.H_TASK_SEQ: str(task.seq)},
                )
            return "ack"
        return None


def later_iteration(event: Message, task: Task) -> bool:
    """Whether ``event`` was recorded by a later iteration of ``task``'s step, stored
    after it (a fresh loop submitted again under the same ids starts at iteration 1)."""
    try:
        iteration = int(event.header(wire.H_ITERATION) or "1")
        seq = int(event.header(wire.H_TASK_SEQ) or "0")
    except ValueError:
        return False
    return iteration > task.iteration and seq > task.seq
