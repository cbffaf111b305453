"""A run's history: its events read back from the events stream, checked and decoded.

Anyone allowed to publish to ``natrio.event.>`` can put a message there, so nothing in an
event is taken on trust: the subject must have natrio's layout and name the run (and step)
asked for, natrio's headers must be well-formed numbers and printable text, and the
payload of a ``failed``, ``dead`` or ``paused`` event must be the JSON natrio writes. An
event that fails any check is skipped and counted, never shown half-read. The stream's
own headers (``Nats-Subject``, ``Nats-Sequence``, ``Nats-Time-Stamp``) come after any a
publisher set, joined to them with ``", "``, so a publisher's copy of one makes it
unreadable and the event is skipped too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from . import _wire as wire
from ._errors import NatrioError
from ._jetstream import JetStream, server_header
from ._model import MAX_ERROR_MESSAGE, MAX_TRACEBACK, TaskError, truncate
from ._transport import Message

#: Event kinds a history shows, in the order a step goes through them.
KINDS = (
    wire.STARTED,
    wire.FAILED,
    wire.PAUSED,
    wire.CONTINUED,
    wire.COMPLETED,
    wire.DEAD,
)

#: The most events :func:`read_history` reads unless told otherwise.
DEFAULT_LIMIT = 10_000

_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")
_MAX_WORKER = 512


@attrs.frozen
class RunEvent:
    """One event of a run, as the events stream stored it (see :meth:`natrio.Client.history`).

    ``time`` is when the stream stored the event (the server's clock); ``started_at`` when
    the execution it belongs to began (the worker's clock, ``Natrio-Started``), for the
    events that carry it. ``task_seq`` is the task message's sequence in ``NATRIO_TASKS``
    (one per submit, and per agent-loop iteration), ``attempt`` the attempt number the
    worker gave the execution. ``error`` is set for ``failed`` and ``dead`` events,
    ``retry_in`` (seconds) for ``failed`` ones, ``delay`` (seconds) for ``paused`` ones;
    ``size`` is the payload's length in bytes (the output of a ``completed`` event, the
    next input of a ``continued`` one).
    """

    seq: int
    time: datetime
    task_type: str
    run_id: str
    step_id: str
    kind: str
    task_seq: int
    attempt: int
    iteration: int
    worker: str
    started_at: datetime | None = None
    error: TaskError | None = None
    retry_in: float | None = None
    delay: float | None = None
    size: int = 0

    @property
    def reason(self) -> str:
        """A one-line account of why the event happened (empty for most completions)."""
        if self.error is not None:
            first = self.error.message.splitlines()[0] if self.error.message else ""
            text = f"{self.error.type}: {first}" if first else self.error.type
            if self.kind == wire.DEAD and self.error.kind not in ("error", "fatal"):
                text = f"{self.error.kind}: {text}"
            if self.retry_in is not None:
                text += f"; retry in {self.retry_in:g} s"
            return text
        if self.delay is not None:
            return f"paused for {self.delay:g} s"
        if self.kind == wire.CONTINUED:
            return f"iteration {self.iteration + 1} queued"
        return ""

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data (times as ISO 8601 strings)."""
        return {
            "seq": self.seq,
            "time": self.time.isoformat(),
            "task_type": self.task_type,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "kind": self.kind,
            "task_seq": self.task_seq,
            "attempt": self.attempt,
            "iteration": self.iteration,
            "worker": self.worker,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "reason": self.reason,
            "error": self.error.to_dict() if self.error is not None else None,
            "retry_in": self.retry_in,
            "delay": self.delay,
            "size": self.size,
        }


@attrs.frozen
class RunHistory:
    """The events of a run (or of one of its steps), oldest first.

    ``skipped`` counts messages under the run's subjects that are not valid natrio events
    (published by something else, or altered), left out; ``truncated`` is true when the
    history has more events than the limit it was read with.
    """

    run_id: str
    step_id: str | None
    events: tuple[RunEvent, ...]
    skipped: int = 0
    truncated: bool = False


def history_filter(run_id: str, step_id: str | None = None) -> str:
    """The events-stream filter of a run's events (or one step's), whatever the task type."""
    return f"{wire.PREFIX}.event.*.{run_id}.{step_id or '*'}.*"


def stream_time(text: str | None) -> datetime | None:
    """A ``Nats-Time-Stamp`` (RFC 3339 in UTC, up to nanoseconds) as a datetime, or None."""
    match = _STAMP.fullmatch(text or "")
    if match is None:
        return None
    whole, fraction = match.groups()
    try:
        when = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    except ValueError:
        return None
    if fraction:
        when = when.replace(microsecond=int(fraction[:6].ljust(6, "0")))
    return when


def _seconds(value: object) -> float | None:
    # JSON numbers only (bool is an int in Python), finite and not negative.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _error(data: object) -> TaskError | None:
    """The TaskError natrio writes as JSON, or None for anything else."""
    if not isinstance(data, Mapping):
        return None
    kind, name = data.get("kind", "error"), data.get("type")
    message, trace = data.get("message", ""), data.get("traceback", "")
    attempts = data.get("attempts", 0)
    if not (
        isinstance(name, str)
        and name
        and isinstance(message, str)
        and isinstance(trace, str)
        and isinstance(kind, str)
        and wire.valid_name(kind)
        and isinstance(attempts, int)
        and not isinstance(attempts, bool)
        and attempts >= 0
    ):
        return None
    return TaskError(
        truncate(name, 200),
        truncate(message, MAX_ERROR_MESSAGE),
        truncate(trace, MAX_TRACEBACK),
        kind,
        attempts,
    )


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # not JSON, or not UTF-8
        return None


def decode_event(msg: Message, run_id: str, step_id: str | None = None) -> RunEvent | None:
    """The event ``msg`` (a message read from the events stream with its ``Nats-*``
    headers) of run ``run_id`` (and step ``step_id``), or None when it is not a valid one."""
    seq = wire.decimal(msg.header("Nats-Sequence"))
    when = stream_time(msg.header("Nats-Time-Stamp"))
    subject = msg.header("Nats-Subject") or ""
    parts = subject.split(".")
    if seq is None or when is None or len(parts) != 6:
        return None
    prefix, family, task_type, run, step, kind = parts
    if (
        prefix != wire.PREFIX
        or family != "event"
        or not wire.valid_name(task_type)
        or run != run_id
        or not wire.valid_id(step)
        or (step_id is not None and step != step_id)
        or kind not in KINDS
    ):
        return None
    task_seq = wire.decimal(msg.header(wire.H_TASK_SEQ))
    attempt = wire.decimal(msg.header(wire.H_ATTEMPT))
    raw_iteration = msg.header(wire.H_ITERATION)
    iteration = 1 if raw_iteration is None else wire.decimal(raw_iteration)
    worker = msg.header(wire.H_WORKER) or ""
    if (
        task_seq is None
        or attempt is None
        or not iteration
        or not worker
        or len(worker) > _MAX_WORKER
        or not worker.isprintable()
        or worker != worker.strip()
    ):
        return None
    started_at = None
    raw_started = msg.header(wire.H_STARTED)
    if raw_started is not None:
        try:
            started = float(raw_started)
        except ValueError:
            return None
        if not (math.isfinite(started) and 0 < started < 1e11):
            return None
        started_at = datetime.fromtimestamp(started, UTC)
    error = retry_in = delay = None
    if kind in (wire.FAILED, wire.DEAD):
        payload = _json(msg.data)
        error = _error(payload)
        if error is None:
            return None
        if kind == wire.FAILED:
            retry_in = _seconds(payload.get("retry_in"))
            if retry_in is None:
                return None
    elif kind == wire.PAUSED:
        payload = _json(msg.data)
        delay = _seconds(payload.get("delay")) if isinstance(payload, dict) else None
        if delay is None:
            return None
    return RunEvent(
        seq=seq,
        time=when,
        task_type=task_type,
        run_id=run,
        step_id=step,
        kind=kind,
        task_seq=task_seq,
        attempt=attempt,
        iteration=iteration,
        worker=worker,
        started_at=started_at,
        error=error,
        retry_in=retry_in,
        delay=delay,
        size=len(msg.data),
    )


async def read_history(
    js: JetStream, run_id: str, step_id: str | None = None, *, limit: int = DEFAULT_LIMIT
) -> RunHistory:
    """Read the events of run ``run_id`` (of step ``step_id`` only, when given), oldest
    first, at most ``limit`` of them (messages skipped as invalid count towards it)."""
    subjects = history_filter(run_id, step_id)
    events: list[RunEvent] = []
    skipped = 0
    after = 0
    more = True
    while more and len(events) + skipped < limit:
        page, more = await js.messages(
            wire.EVENT_STREAM, subjects, after=after, batch=min(256, limit - len(events) - skipped)
        )
        if not page:
            break
        for msg in page:
            # The server's sequence, after any the publisher set: page on it.
            seq = wire.decimal(server_header(msg, "Nats-Sequence"))
            if seq is None or seq <= after:
                raise NatrioError(f"the events stream answered out of order (after {after})")
            after = seq
            event = decode_event(msg, run_id, step_id)
            if event is None:
                skipped += 1
            else:
                events.append(event)
    truncated = more and len(events) + skipped >= limit
    return RunHistory(run_id, step_id, tuple(events), skipped, truncated)
