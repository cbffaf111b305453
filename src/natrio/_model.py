"""Data records natrio's parts pass around and store: tasks, errors, dead letters, workers.

Values only: how they are published and read back lives with the code that does it.
"""

from __future__ import annotations

import base64
import json
import traceback as tb
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import Fatal, Retryable
from ._retry import RetryPolicy
from ._wire import valid_dead_input_ref, valid_header, valid_id, valid_name

#: Bounds of what a TaskError keeps: a handler's exception text or traceback can be any
#: size, and a dead-letter entry must fit in one message.
MAX_ERROR_MESSAGE = 4096
MAX_TRACEBACK = 16384


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    if len(marker) >= limit:
        return text[:limit]
    keep = limit - len(marker)
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head) :]


@attrs.frozen
class Task:
    """One delivery of a task, as read off the wire. Frozen: middleware and hooks get this value.

    ``attempt`` is 1-based and counts deliveries (from the ack subject) less pauses;
    ``delivered`` is the raw delivery count; ``seq`` is the task's sequence in the task
    stream; ``deadline`` is a Unix time or None; ``retry`` is the policy sent with the
    task, if any; ``reply`` the subject a waiting client listens on, if any (only inbox
    subjects: see docs/guarantees.md); ``iteration`` counts agent-loop iterations from 1;
    ``resumed`` is true on the first delivery after a pause; ``started_at`` is the Unix time
    this execution began (None for a task handed back without running); ``placement`` is
    where it was routed: ``p<k>`` in partition k, ``t<claim>`` or ``s<claim>`` for a
    target (see :attr:`partition` and :attr:`target`), None for neither.
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
    started_at: float | None = None
    placement: str | None = None

    @property
    def partition(self) -> int | None:
        """The partition the task ran in, or None when its type is not partitioned."""
        if self.placement is not None and self.placement[0] == "p":
            return int(self.placement[1:])
        return None

    @property
    def target(self) -> str | None:
        """The claim the task was sent to, or None when it was not targeted."""
        if self.placement is not None and self.placement[0] in "ts":
            return self.placement[1:]
        return None

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
    (an agent loop reached ``max_iterations``). The message is kept to 4 KiB and the
    traceback to 16 KiB (head and tail).
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
        try:
            message = str(shown)
        except Exception as failure:  # an exception whose __str__ fails is still a failure
            message = f"<str() failed: {type(failure).__name__}>"
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls(
            truncate(type(shown).__name__, 200),
            truncate(message, MAX_ERROR_MESSAGE),
            truncate(text, MAX_TRACEBACK),
            kind,
            attempts,
        )

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
    """A dead-letter entry: the original task, why it died, where and when.

    ``input`` is the task's input; when it did not fit in the entry beside everything
    else, it is kept in the ``natrio_dead_inputs`` object store under ``input_ref``,
    ``dlq-<task_seq>`` (``input`` is then empty; :meth:`natrio.Client.dead_letter_input`
    reads it). ``headers`` are the task's, those that are RFC 7230 tokens with one-line
    values (at most 16 KiB of them; ``Natrio-Headers-Cut`` counts any left out).
    ``subject`` is the task's subject as received (bytes that are not UTF-8 appear as
    ``\\x..`` escapes). ``seq`` is the entry's sequence in the ``NATRIO_DLQ`` stream, set
    on entries read from it (:meth:`natrio.Client.dead_letters`; 0 otherwise, and not
    stored: the stream gives it).
    """

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
    input_ref: str | None = None
    seq: int = 0

    def to_json(self) -> bytes:
        """The entry as stored in the dead-letter stream."""
        data = attrs.asdict(self, recurse=False)
        del data["seq"]
        data["input"] = base64.b64encode(self.input).decode()
        data["headers"] = dict(self.headers)
        data["error"] = self.error.to_dict()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, seq: int = 0) -> DeadLetter:
        """Read an entry written by :meth:`to_json` (its stream sequence is ``seq``).

        Anyone allowed to publish on ``natrio.dead.>`` can store anything there, so every
        field is checked: ValueError for anything that is not such an entry (fields this
        natrio does not know, from a newer one, are ignored).
        """
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        values: dict[str, Any] = {
            "task_type": _checked(data, "task_type", _NAME, "task type"),
            "group": _checked(data, "group", _NAME, "group"),
            "run_id": _checked(data, "run_id", _ID, "run id"),
            "step_id": _checked(data, "step_id", _ID, "step id"),
        }
        for key in ("subject", "worker_id", "time"):
            values[key] = _text(data, key, _MAX_FIELD)
        text = _text(data, "input", 2**31)
        try:
            values["input"] = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("input is not base64") from None
        headers = data.get("headers")
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("headers is not an object of strings")
        for name, value in headers.items():
            # Headers are shown and published again: tokens and single lines only.
            if not valid_header(name, value):
                raise ValueError(f"header {name[:64]!r} is not a token with a one-line value")
        values["headers"] = headers
        error = data.get("error")
        if not isinstance(error, dict):
            raise ValueError("error is not an object")
        for key in ("type", "message", "traceback", "kind"):
            _text(error, key, 2**20)
        values["error"] = TaskError(
            error["type"],
            error["message"],
            error["traceback"],
            error["kind"],
            _count(error, "attempts"),
        )
        values["attempts"] = _count(data, "attempts")
        values["task_seq"] = _count(data, "task_seq")
        ref = data.get("input_ref")
        if ref is not None and (not isinstance(ref, str) or not 0 < len(ref) <= 256):
            raise ValueError("input_ref is not null or a name of 1 to 256 characters")
        if ref is not None and values["input"]:
            raise ValueError("an entry with an input_ref has an empty input")
        if ref is not None and not valid_dead_input_ref(ref, values["task_seq"]):
            # Its own task's name only: else replaying or purging it would take another's.
            raise ValueError(f"input_ref {ref[:64]!r} is not the name of this task's input")
        return cls(**values, input_ref=ref, seq=seq)


# What DeadLetter.from_json checks names and ids with: _wire's rules.
_NAME = valid_name
_ID = valid_id
#: The longest subject, worker id or time a dead-letter entry may have.
_MAX_FIELD = 8192


def _text(data: Mapping[str, Any], key: str, limit: int) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    if len(value) > limit:
        raise ValueError(f"{key} is over {limit} characters")
    return value


def _checked(data: Mapping[str, Any], key: str, valid: Callable[[str], bool], kind: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    if not valid(value):
        raise ValueError(f"{key} is not a valid {kind}: {value[:80]!r}")
    return value


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{key} is not a count")
    return value


@attrs.frozen
class WorkerInfo:
    """A worker's directory entry, as :func:`natrio.list_workers` returns it."""

    worker_id: str
    worker_name: str
    task_types: tuple[str, ...]
    groups: tuple[str, ...]
    hostname: str
    pid: int
    version: str
    started_at: str
    last_seen: str
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    #: The claims it holds (targeted tasks for these run here), its own name's included.
    claims: tuple[str, ...] = ()
    #: The partitions it holds, by ``<task_type>/<group>``.
    partitions: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)
    #: Per task type, what bounds it across the deployment: ``partitions``,
    #: ``max_in_flight`` (1 for a singleton).
    routing: Mapping[str, Mapping[str, int]] = attrs.field(factory=dict)
    #: True from the moment it begins to stop: it takes no new partitions or claims.
    stopping: bool = False

    def to_json(self) -> bytes:
        """The entry as stored."""
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerInfo:
        """Read a stored entry (fields it does not know, from a newer natrio, are ignored);
        ValueError for an entry of another shape."""
        try:
            return cls._from_data(json.loads(raw))
        except (AttributeError, TypeError, KeyError) as exc:
            raise ValueError(f"not a worker directory entry: {exc!r}") from None

    @classmethod
    def _from_data(cls, data: Any) -> WorkerInfo:
        known = {field.name for field in attrs.fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["task_types"] = tuple(data["task_types"])
        data["groups"] = tuple(data["groups"])
        data["claims"] = tuple(data.get("claims") or ())
        data["partitions"] = {
            str(key): tuple(int(p) for p in value)
            for key, value in (data.get("partitions") or {}).items()
        }
        data["routing"] = {
            str(key): {str(k): int(v) for k, v in value.items()}
            for key, value in (data.get("routing") or {}).items()
        }
        return cls(**data)


@attrs.frozen
class PauseRecord:
    """How often one task message was handed back without failing, and when it last paused.

    Pauses and shutdown returns are NAKs, which the server counts as deliveries;
    subtracting them keeps the attempt number (and the retry budget) what it was.
    """

    seq: int
    pauses: int
    delivered_at_last_pause: int
    returns: int = 0

    def to_json(self) -> bytes:
        """The record as stored."""
        return json.dumps(attrs.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PauseRecord:
        """Read a stored record."""
        return cls(**json.loads(raw))
