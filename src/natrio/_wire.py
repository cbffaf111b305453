"""The names natrio's parts agree on: streams, buckets, subjects, headers and the rules for names.

Subject layout (``<...>`` are tokens, each validated by :func:`check_name` or :func:`check_id`)::

    natrio.task.<task_type>.<group>.<run_id>.<step_id>      task stream (work queue)
    natrio.event.<task_type>.<run_id>.<step_id>.<kind>      events stream
    natrio.dead.<task_type>.<group>.<run_id>.<step_id>      dead-letter stream
    natrio.stream.<run_id>.<step_id>                        step output (core NATS)

    KV natrio_checkpoints   <run_id>.<step_id>              a step's checkpoint
                            <run_id>.<step_id>.pause        a task message's pause record
    KV natrio_signals       <run_id>.<signal name>          a run's signals

One durable consumer serves one (task type, group) pair; its name is
``<task_type>~<group>``, and ``~`` is not allowed inside names so it cannot collide.
"""

from __future__ import annotations

import re
from typing import Any, Final

from ._errors import ConfigurationError

PREFIX: Final = "natrio"

TASK_STREAM: Final = "NATRIO_TASKS"
EVENT_STREAM: Final = "NATRIO_EVENTS"
DEAD_STREAM: Final = "NATRIO_DLQ"

WORKERS_BUCKET: Final = "natrio_workers"
CHECKPOINTS_BUCKET: Final = "natrio_checkpoints"
SIGNALS_BUCKET: Final = "natrio_signals"
GROUPS_BUCKET: Final = "natrio_groups"
#: Object store bucket for dead-letter inputs too large to sit in their entry.
DEAD_INPUTS_BUCKET: Final = "natrio_dead_inputs"

DEFAULT_GROUP: Final = "default"

# Headers natrio sets on task messages.
H_MSG_ID: Final = "Nats-Msg-Id"
H_RETRY: Final = "Natrio-Retry"
H_DEADLINE: Final = "Natrio-Deadline"
H_REPLY: Final = "Natrio-Reply"
H_SUBMITTED: Final = "Natrio-Submitted"
# Headers natrio sets on events and replies.
H_OUTCOME: Final = "Natrio-Outcome"
H_TASK_SEQ: Final = "Natrio-Task-Seq"
H_ATTEMPT: Final = "Natrio-Attempt"
H_WORKER: Final = "Natrio-Worker"
H_ITERATION: Final = "Natrio-Iteration"
#: The Unix time the execution an event belongs to began.
H_STARTED: Final = "Natrio-Started"

# Event kinds, the last token of an event subject.
STARTED: Final = "started"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
DEAD: Final = "dead"
PAUSED: Final = "paused"
CONTINUED: Final = "continued"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid task type, group or signal name, else raise.

    Names are 1-64 characters of ASCII letters, digits, ``_`` and ``-``: they become
    subject tokens and consumer names, where ``.``, ``*``, ``>`` and whitespace break
    routing.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigurationError(
            f"invalid {kind} {value!r}: use 1-64 ASCII letters, digits, '_' or '-' "
            "(no '.', '*', '>', whitespace or empty names)"
        )
    return value


def check_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid run id or step id, else raise ConfigurationError.

    Ids are 1-128 characters of ASCII letters, digits and ``_ - =``: they become subject
    tokens and KV keys (where nats.go and the ``nats`` CLI accept no other characters),
    and ``:`` separates them in message ids.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigurationError(
            f"invalid {kind} {value!r}: use 1-128 ASCII letters, digits, '_', '-' or '='"
        )
    return value


def task_subject(task_type: str, group: str, run_id: str, step_id: str) -> str:
    """The subject a task is published on."""
    return f"{PREFIX}.task.{task_type}.{group}.{run_id}.{step_id}"


def task_filter(task_type: str, group: str) -> str:
    """The filter of the consumer serving one task type in one group."""
    return f"{PREFIX}.task.{task_type}.{group}.>"


def consumer_config(task_type: str, group: str, ack_wait: float) -> dict[str, Any]:
    """The durable consumer serving one task type in one group, as workers create it."""
    return {
        "durable_name": consumer_name(task_type, group),
        "filter_subject": task_filter(task_type, group),
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait * 1_000_000_000),
        # Retries are the worker's decision (RetryPolicy), not the server's.
        "max_deliver": -1,
        "max_ack_pending": -1,
        "deliver_policy": "all",
        "replay_policy": "instant",
    }


def consumer_name(task_type: str, group: str) -> str:
    """The durable consumer name for one task type in one group."""
    return f"{task_type}~{group}"


def event_subject(task_type: str, run_id: str, step_id: str, kind: str) -> str:
    """The subject of one kind of event for one step."""
    return f"{PREFIX}.event.{task_type}.{run_id}.{step_id}.{kind}"


def dead_subject(task_type: str, group: str, run_id: str, step_id: str) -> str:
    """The subject of a step's dead-letter entry."""
    return f"{PREFIX}.dead.{task_type}.{group}.{run_id}.{step_id}"


def task_msg_id(task_type: str, run_id: str, step_id: str, iteration: int = 0) -> str:
    """The ``Nats-Msg-Id`` that makes a second submit (or re-enqueue) of the same step a no-op."""
    base = f"task:{task_type}:{run_id}:{step_id}"
    return f"{base}:{iteration}" if iteration else base


def stream_subject(run_id: str, step_id: str) -> str:
    """The core subject a step's streamed output goes to."""
    return f"{PREFIX}.stream.{run_id}.{step_id}"


def checkpoint_key(run_id: str, step_id: str) -> str:
    """The checkpoints-bucket key of a step's checkpoint."""
    return f"{run_id}.{step_id}"


def pause_key(run_id: str, step_id: str) -> str:
    """The checkpoints-bucket key of a step's pause record."""
    return f"{run_id}.{step_id}.pause"


def signal_key(run_id: str, name: str) -> str:
    """The signals-bucket key of one signal of a run."""
    return f"{run_id}.{name}"


def outcome_msg_id(kind: str, task_type: str, run_id: str, step_id: str, task_seq: int) -> str:
    """The ``Nats-Msg-Id`` of a terminal event: one per step execution record.

    It includes the task's stream sequence so that a step submitted again later (a new
    task) gets its own outcome, while a redelivery of the same task cannot add a second.
    """
    return f"{kind}:{task_type}:{run_id}:{step_id}:{task_seq}"


def parse_task_subject(subject: str) -> tuple[str, str, str, str] | None:
    """Split a task subject into (task_type, group, run_id, step_id), or None if malformed."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[0] != PREFIX or parts[1] != "task":
        return None
    return parts[2], parts[3], parts[4], parts[5]


def parse_ack_subject(reply: str) -> tuple[int, int]:
    """Return (delivery count, stream sequence) from a JetStream ack subject.

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``;
    v2 adds domain and account hash after ``$JS.ACK`` and a random token at the end.
    """
    parts = reply.split(".")
    if len(parts) == 9:
        return int(parts[4]), int(parts[5])
    if len(parts) >= 11:
        return int(parts[6]), int(parts[7])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")
