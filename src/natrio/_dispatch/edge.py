"""The wire edge, free of I/O: a delivered message becomes a valid :class:`Task`, or
:class:`MalformedTask` says which rule it broke.

Any client in any language can publish on natrio's subjects, so every field natrio acts on
is checked here, once, against the syntax and limits docs/subjects.md states, before
natrio does anything on the message's behalf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from .. import _schedules as schedules
from .. import _wire as wire
from .._errors import ConfigurationError, MalformedTask
from .._model import Task
from .._retry import RetryPolicy
from .._transport import Message
from .._transport.protocol import check_subject, valid_header_name

#: The longest ``Natrio-Reply`` natrio answers on.
MAX_REPLY: Final = 256
#: The longest ``Natrio-Retry`` policy.
MAX_RETRY_HEADER: Final = 1024
#: The latest deadline natrio takes (Unix seconds, the year 5138).
MAX_DEADLINE: Final = 1e11

# A valid task subject in one match; the slower checks below only say why one is not.
# The group token is the group, or ``<group>~<placement>`` for a placed task.
_TASK_SUBJECT = re.compile(
    r"natrio\.task\.([A-Za-z0-9_-]{1,64})\.([A-Za-z0-9_-]{1,64}(?:~[pts][A-Za-z0-9_-]{1,64})?)"
    r"\.([A-Za-z0-9_=-]{1,128})\.([A-Za-z0-9_=-]{1,128})"
)
_NUMBER = re.compile(r"[0-9]{1,12}(\.[0-9]{1,17})?")
_ITERATION = re.compile(r"[1-9][0-9]{0,8}")

# natrio's task headers, and their names in lower case: a name that matches one but for
# case is refused rather than quietly ignored.
_TASK_HEADERS: Final = frozenset(
    {wire.H_RETRY, wire.H_DEADLINE, wire.H_REPLY, wire.H_SUBMITTED, wire.H_ITERATION, wire.H_KEY}
)
_LOWER: Final = {name.lower(): name for name in _TASK_HEADERS}
# The only headers of JetStream's message schedules a task may carry: those the server
# adds to the task it stores when a schedule fires (see _fired_run_id).
_FIRED_HEADERS: Final = frozenset({wire.H_SCHEDULER, wire.H_SCHEDULE_NEXT})


# A JetStream ack subject (v1: 9 tokens; v2: domain and account hash first, then the v1
# tokens and maybe more) of tokens check_subject accepts: one pattern reads it and checks
# it. A ``*`` or ``>`` anywhere takes the long way, which refuses wildcard tokens.
_TOKEN = r"[!-\-/-~]+"
_ACK_V1 = re.compile(rf"\$JS\.ACK\.{_TOKEN}\.{_TOKEN}\.([0-9]+)\.([0-9]+)(?:\.{_TOKEN}){{3}}")
_ACK_V2 = re.compile(rf"\$JS\.ACK(?:\.{_TOKEN}){{4}}\.([0-9]+)\.([0-9]+)(?:\.{_TOKEN}){{3,}}")


def ack_position(reply: str) -> tuple[int, int] | None:
    """(delivery count, stream sequence) from a JetStream ack subject, or None if it is not
    one (or not one natrio may publish to)."""
    if not reply.startswith("$JS.ACK.") or len(reply) > 512:
        return None
    if "*" not in reply and ">" not in reply:
        plain = _ACK_V1.fullmatch(reply) or _ACK_V2.fullmatch(reply)
        if plain is None:
            return None
        delivered, seq = int(plain[1]), int(plain[2])
        return (delivered, seq) if delivered >= 1 and seq >= 1 else None
    try:
        check_subject(reply, wildcards=False)
        delivered, seq = wire.parse_ack_subject(reply)
    except ValueError:
        return None
    return (delivered, seq) if delivered >= 1 and seq >= 1 else None


def valid_iteration(value: str) -> bool:
    """Whether ``value`` is a ``Natrio-Iteration`` the edge takes (1 to 999,999,999)."""
    return _ITERATION.fullmatch(value) is not None


def split_task_subject(subject: str) -> tuple[str, str, str, str] | None:
    """(task type, group token, run id, step id) of a task subject the edge takes, or
    None. The group token is the group, or ``<group>~<placement>`` for a placed task."""
    match = _TASK_SUBJECT.fullmatch(subject)
    return None if match is None else (match[1], match[2], match[3], match[4])


def reply_target(value: str, inbox_prefix: str) -> str | None:
    """Where to answer a ``Natrio-Reply`` of valid syntax: itself when it is under the
    inbox prefix, else None (the outcome is recorded without a reply)."""
    return value if value.startswith(inbox_prefix + ".") else None


def check_reply(value: str) -> str:
    """``value`` if it is a valid ``Natrio-Reply`` (a subject without wildcards, at most
    256 characters), else raise MalformedTask."""
    if len(value) > MAX_REPLY:
        raise MalformedTask(f"{wire.H_REPLY} is {len(value)} characters long (at most {MAX_REPLY})")
    try:
        check_subject(value, kind=wire.H_REPLY, wildcards=False)
    except ValueError as exc:
        raise MalformedTask(str(exc)) from None
    return value


def _number(name: str, value: str) -> float:
    if not _NUMBER.fullmatch(value):
        raise MalformedTask(f"bad {name} header {value[:64]!r}: not a decimal number of seconds")
    return float(value)


def _name_problem(name: str) -> str:
    if not valid_header_name(name):
        return f"invalid header name {name[:64]!r}"
    lower = name.lower()
    canonical = _LOWER.get(lower)
    if canonical is not None and canonical != name:
        return f"header {name!r}: natrio's header names are exact ({canonical})"
    if lower.startswith("nats-schedule") and name not in _FIRED_HEADERS:
        # A schedule message on a task subject (or a fired task's header in another case):
        # acking it would run the schedule's payload as a task and delete the schedule.
        return (
            f"header {name[:64]!r}: a task carries no message-schedule header but "
            f"{' and '.join(sorted(_FIRED_HEADERS))}, as the server sets them on a fired task"
        )
    return ""


# Header names already judged ("" for fine): the same few names come on every task.
_judged_names: dict[str, str] = {}


def check_headers(headers: Mapping[str, str]) -> None:
    """Raise MalformedTask for a header name that is not a token, one of natrio's names in
    another case, or a value with a line break."""
    for name, value in headers.items():
        problem = _judged_names.get(name)
        if problem is None:
            problem = _name_problem(name)
            if len(_judged_names) < 1024:
                _judged_names[name] = problem
        if problem:
            raise MalformedTask(problem)
        if "\n" in value or "\r" in value:
            # A lone line break survives parsing but could not be published again.
            raise MalformedTask(f"header {name!r} has a line break in its value")


def read_task(
    msg: Message,
    *,
    task_type: str,
    group: str,
    inbox_prefix: str,
    position: tuple[int, int] | None = None,
    started_at: float | None = None,
) -> Task:
    """The task in ``msg``, delivered by the consumer of ``task_type`` in ``group``.

    ``group`` is the group token the consumer filters on: the group, or
    ``<group>~<placement>`` for a consumer of placed tasks. Raises MalformedTask naming the first rule the message breaks. ``reply`` is set only
    for a ``Natrio-Reply`` under ``inbox_prefix``. ``position`` is the message's
    :func:`ack_position` when the caller has read it already; ``started_at`` becomes the
    task's (the Unix time its execution begins).
    """
    if position is None:
        position = ack_position(msg.reply)
    if position is None:
        raise MalformedTask(f"not a JetStream ack subject: {msg.reply[:100]!r}")
    delivered, seq = position
    subject = msg.subject
    match = _TASK_SUBJECT.fullmatch(subject)
    if match is None:
        raise MalformedTask(_subject_problem(subject, task_type, group))
    if match[1] != task_type or match[2] != group:
        raise MalformedTask(f"subject {subject[:200]!r} is not for {task_type} in {group}")
    run_id, step_id = match[3], match[4]
    plain_group, _, placement = group.partition("~")
    headers = msg.headers or {}
    retry = None
    deadline = None
    reply = None
    iteration = 1
    if headers:
        check_headers(headers)
        text = headers.get(wire.H_RETRY)
        if text is not None:
            if len(text) > MAX_RETRY_HEADER:
                raise MalformedTask(f"{wire.H_RETRY} is over {MAX_RETRY_HEADER} characters")
            try:
                retry = RetryPolicy.from_json(text)
            except (ConfigurationError, RecursionError) as exc:
                raise MalformedTask(f"bad {wire.H_RETRY} header: {exc}") from None
        text = headers.get(wire.H_DEADLINE)
        if text is not None:
            deadline = _number(wire.H_DEADLINE, text)
            if not 0 < deadline <= MAX_DEADLINE:
                raise MalformedTask(f"bad {wire.H_DEADLINE} header {text!r}: out of range")
        text = headers.get(wire.H_SUBMITTED)
        if text is not None and not _NUMBER.fullmatch(text):
            _number(wire.H_SUBMITTED, text)
        text = headers.get(wire.H_ITERATION)
        if text is not None:
            if not _ITERATION.fullmatch(text):
                raise MalformedTask(f"bad {wire.H_ITERATION} header {text[:64]!r}")
            iteration = int(text)
        text = headers.get(wire.H_REPLY)
        if text:
            reply = reply_target(check_reply(text), inbox_prefix)
        text = headers.get(wire.H_KEY)
        if text is not None and len(text) > wire.MAX_KEY:
            raise MalformedTask(f"{wire.H_KEY} is over {wire.MAX_KEY} characters")
        scheduler = headers.get(wire.H_SCHEDULER)
        next_time = headers.get(wire.H_SCHEDULE_NEXT)
        if scheduler is not None or next_time is not None:
            run_id = _fired_run_id(
                msg.reply, scheduler, next_time, task_type, plain_group, run_id, step_id
            )
    return Task(
        task_type=task_type,
        group=plain_group,
        placement=placement or None,
        run_id=run_id,
        step_id=step_id,
        input=msg.data,
        headers=headers,
        attempt=delivered,
        seq=seq,
        deadline=deadline,
        retry=retry,
        reply=reply,
        iteration=iteration,
        delivered=delivered,
        started_at=started_at,
    )


def ack_timestamp(reply: str) -> int | None:
    """The stream timestamp (nanoseconds since the epoch) in a JetStream ack subject, or
    None if it is not one natrio takes."""
    if ack_position(reply) is None:
        return None
    parts = reply.split(".")
    token = parts[7] if len(parts) == 9 else parts[9]
    return int(token) if schedules.valid_timestamp(token) else None


def _fired_run_id(
    reply: str,
    scheduler: str | None,
    next_time: str | None,
    task_type: str,
    group: str,
    run_id: str,
    step_id: str,
) -> str:
    """The run id of a task a message schedule stored (``Nats-Scheduler`` names the
    schedule, ``Nats-Schedule-Next`` says ``purge`` or when it fires next), or raise.

    Only natrio's own schedules of this very task are taken: a delayed task's, whose run
    id stays the subject's, and a recurring schedule's firing on
    ``<schedule_id>.<step_id>``, whose run id is the schedule id and the firing's stream
    timestamp (so every firing is a run of its own). Anyone may publish these headers
    (the server lets a client send ``purge``), so they must agree with the subject.
    """
    if scheduler is None or next_time is None:
        raise MalformedTask(
            f"{wire.H_SCHEDULER} and {wire.H_SCHEDULE_NEXT} come together on a fired task"
        )
    if next_time != schedules.NEXT_PURGE and not schedules.NEXT_TIME.fullmatch(next_time):
        raise MalformedTask(f"bad {wire.H_SCHEDULE_NEXT} header {next_time[:64]!r}")
    if scheduler == wire.delayed_subject(task_type, group, run_id, step_id):
        if next_time != schedules.NEXT_PURGE:
            raise MalformedTask(f"a delayed task fires once: {wire.H_SCHEDULE_NEXT} is not purge")
        return run_id
    if scheduler == wire.schedule_subject(task_type, group, run_id):
        if len(run_id) > schedules.MAX_SCHEDULE_ID:
            raise MalformedTask(
                f"schedule id {run_id[:64]!r}... is over {schedules.MAX_SCHEDULE_ID} characters"
            )
        stamp = ack_timestamp(reply)
        if stamp is None:
            raise MalformedTask(f"no stream timestamp in the ack subject {reply[:100]!r}")
        return schedules.firing_run_id(run_id, stamp)
    raise MalformedTask(
        f"{wire.H_SCHEDULER} {scheduler[:200]!r} is not this task's schedule "
        f"({wire.delayed_subject(task_type, group, '<run_id>', '<step_id>')} or "
        f"{wire.schedule_subject(task_type, group, '<run_id>')} of its own ids)"
    )


def _subject_problem(subject: str, task_type: str, group: str) -> str:
    """Why ``subject`` is not a task subject for ``task_type`` in ``group``."""
    if not subject.isascii():
        return "the subject is not ASCII"
    parts = subject.split(".")
    if len(parts) != 6 or parts[0] != wire.PREFIX or parts[1] != "task":
        return f"subject {subject[:200]!r} is not natrio.task.<type>.<group>.<run_id>.<step_id>"
    if parts[2] != task_type or parts[3] != group:
        return f"subject {subject[:200]!r} is not for {task_type} in {group}"
    if not wire.valid_id(parts[4]):
        return f"run id {parts[4][:64]!r}: use 1-128 of A-Z a-z 0-9 _ - ="
    if not wire.valid_id(parts[5]):
        return f"step id {parts[5][:64]!r}: use 1-128 of A-Z a-z 0-9 _ - ="
    return f"subject {subject[:200]!r} is not for a task type and group natrio names"
