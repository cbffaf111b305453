"""The names natrio's parts agree on: streams, buckets, subjects, headers and the rules for names.

Subject layout (``<...>`` are tokens, each validated by :func:`check_name` or :func:`check_id`)::

    natrio.task.<task_type>.<group>.<run_id>.<step_id>      task stream (work queue)
    natrio.task.<task_type>.<group>~<placement>.<run_id>.<step_id>
                                                            a placed task: ``p<k>`` in
                                                            partition k, ``t<claim>`` for
                                                            a claim, ``s<claim>`` soft
    natrio.event.<task_type>.<run_id>.<step_id>.<kind>      events stream
    natrio.dead.<task_type>.<group>.<run_id>.<step_id>      dead-letter stream
    natrio.stream.<run_id>.<step_id>                        step output (core NATS)
    natrio.delayed.<task_type>.<group>.<run_id>.<step_id>   task stream: a delayed task's
                                                            one-shot schedule
    natrio.schedule.<task_type>.<group>.<schedule_id>       task stream: a recurring schedule

    KV natrio_checkpoints   <run_id>.<step_id>              a step's checkpoint
                            <run_id>.<step_id>.pause        a task message's pause record
    KV natrio_signals       <run_id>.<signal name>          a run's signals
    KV natrio_routing       partitions.<task_type>          a task type's partition count
    natrio.counter.rate.<task_type>.<key>.<window>         cluster rate-limit counters

One durable consumer serves one (task type, group) pair; its name is
``<task_type>~<group>``, and ``~`` is not allowed inside names so it cannot collide. A
placed task's consumer is ``<task_type>~<group>~<placement>``: its filter differs from the
plain one in the group token, so the two never overlap (a work-queue stream refuses
consumers whose filters overlap).
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
#: KV bucket of routing facts every worker and client must agree on (partition counts).
ROUTING_BUCKET: Final = "natrio_routing"
#: The stream of cluster-wide rate-limit counters (``allow_msg_counter``).
COUNTER_STREAM: Final = "NATRIO_COUNTERS"

#: The most partitions a task type may have.
MAX_PARTITIONS: Final = 256

DEFAULT_GROUP: Final = "default"

# Headers natrio sets on task messages.
H_MSG_ID: Final = "Nats-Msg-Id"
H_RETRY: Final = "Natrio-Retry"
H_DEADLINE: Final = "Natrio-Deadline"
H_REPLY: Final = "Natrio-Reply"
H_SUBMITTED: Final = "Natrio-Submitted"
#: The partition key of a task published without its partition (see docs/routing.md).
H_KEY: Final = "Natrio-Key"
#: The longest ``Natrio-Key`` natrio takes (and sends).
MAX_KEY: Final = 1024
# Headers natrio sets on events and replies.
H_OUTCOME: Final = "Natrio-Outcome"
H_TASK_SEQ: Final = "Natrio-Task-Seq"
H_ATTEMPT: Final = "Natrio-Attempt"
H_WORKER: Final = "Natrio-Worker"
H_ITERATION: Final = "Natrio-Iteration"
#: The Unix time the execution an event belongs to began.
H_STARTED: Final = "Natrio-Started"
# JetStream's message-schedule headers: on a schedule message (natrio sets them), and
# H_SCHEDULER with H_SCHEDULE_NEXT on the task the server stores when it fires.
H_SCHEDULE: Final = "Nats-Schedule"
H_SCHEDULE_TARGET: Final = "Nats-Schedule-Target"
H_SCHEDULE_TIME_ZONE: Final = "Nats-Schedule-Time-Zone"
H_SCHEDULER: Final = "Nats-Scheduler"
H_SCHEDULE_NEXT: Final = "Nats-Schedule-Next"

# Event kinds, the last token of an event subject.
STARTED: Final = "started"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
DEAD: Final = "dead"
PAUSED: Final = "paused"
CONTINUED: Final = "continued"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")
_DECIMAL_DIGITS = 20  # enough for any uint64, which JetStream's sequences are


def valid_name(text: str) -> bool:
    """Whether ``text`` is a valid task type, group, worker, claim or signal name: 1-64
    ASCII letters, digits, ``_`` and ``-`` (the rule :func:`check_name` enforces)."""
    return _NAME.fullmatch(text) is not None


def valid_id(text: str) -> bool:
    """Whether ``text`` is a valid run id or step id: 1-128 ASCII letters, digits, ``_``,
    ``-`` and ``=`` (the rule :func:`check_id` enforces)."""
    return _ID.fullmatch(text) is not None


def decimal(text: str | None) -> int | None:
    """A header's non-negative decimal number, or None for anything else (absent, empty,
    a sign, a space, non-ASCII digits, or more than 20 digits)."""
    if not text or len(text) > _DECIMAL_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid task type, group or signal name, else raise.

    Names are 1-64 characters of ASCII letters, digits, ``_`` and ``-``: they become
    subject tokens and consumer names, where ``.``, ``*``, ``>`` and whitespace break
    routing.
    """
    if not isinstance(value, str) or not valid_name(value):
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
    if not isinstance(value, str) or not valid_id(value):
        raise ConfigurationError(
            f"invalid {kind} {value!r}: use 1-128 ASCII letters, digits, '_', '-' or '='"
        )
    return value


def partition_placement(partition: int) -> str:
    """The placement of partition ``partition`` (0-based)."""
    return f"p{partition}"


def claim_placement(claim: str, *, soft: bool = False) -> str:
    """The placement of a task for workers holding ``claim`` (``soft``: or anyone, when
    nobody holding it is alive)."""
    return f"{'s' if soft else 't'}{claim}"


def group_token(group: str, placement: str | None = None) -> str:
    """The group token of a task subject: the group, with its placement if it has one."""
    return f"{group}~{placement}" if placement else group


def task_subject(
    task_type: str, group: str, run_id: str, step_id: str, placement: str | None = None
) -> str:
    """The subject a task is published on."""
    return f"{PREFIX}.task.{task_type}.{group_token(group, placement)}.{run_id}.{step_id}"


def task_filter(task_type: str, group: str, placement: str | None = None) -> str:
    """The filter of the consumer serving one task type in one group (and placement)."""
    return f"{PREFIX}.task.{task_type}.{group_token(group, placement)}.>"


def consumer_config(
    task_type: str,
    group: str,
    ack_wait: float,
    *,
    placement: str | None = None,
    max_ack_pending: int = -1,
) -> dict[str, Any]:
    """The durable consumer serving one task type in one group, as workers create it.

    ``max_ack_pending`` bounds the tasks in flight across every worker pulling it: 1 for
    a partition or a singleton, whose next task the server then withholds until the
    previous one is settled, whoever pulls.
    """
    return {
        "durable_name": consumer_name(task_type, group, placement),
        "filter_subject": task_filter(task_type, group, placement),
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait * 1_000_000_000),
        # Retries are the worker's decision (RetryPolicy), not the server's.
        "max_deliver": -1,
        "max_ack_pending": max_ack_pending,
        "deliver_policy": "all",
        "replay_policy": "instant",
    }


def consumer_name(task_type: str, group: str, placement: str | None = None) -> str:
    """The durable consumer name for one task type in one group (and placement)."""
    return f"{task_type}~{group_token(group, placement)}"


def partitions_key(task_type: str) -> str:
    """The routing-bucket key holding a task type's partition count."""
    return f"partitions.{task_type}"


def event_subject(task_type: str, run_id: str, step_id: str, kind: str) -> str:
    """The subject of one kind of event for one step."""
    return f"{PREFIX}.event.{task_type}.{run_id}.{step_id}.{kind}"


def dead_subject(task_type: str, group: str, run_id: str, step_id: str) -> str:
    """The subject of a step's dead-letter entry."""
    return f"{PREFIX}.dead.{task_type}.{group}.{run_id}.{step_id}"


def delayed_subject(task_type: str, group: str, run_id: str, step_id: str) -> str:
    """The subject of a delayed task's one-shot schedule (in the task stream, outside
    every task consumer's filter). ``group`` is the plain group, without a placement."""
    return f"{PREFIX}.delayed.{task_type}.{group}.{run_id}.{step_id}"


def schedule_subject(task_type: str, group: str, schedule_id: str) -> str:
    """The subject of a recurring schedule (in the task stream, outside every task
    consumer's filter)."""
    return f"{PREFIX}.schedule.{task_type}.{group}.{schedule_id}"


def dead_filter(task_type: str | None = None, group: str | None = None) -> str:
    """The filter of the dead-letter entries of one task type and/or group (checked names,
    or None for any), or of every message in the dead-letter stream."""
    if task_type is None and group is None:
        return f"{PREFIX}.dead.>"
    return f"{PREFIX}.dead.{task_type or '*'}.{group or '*'}.>"


def replay_msg_id(task_type: str, run_id: str, step_id: str, dead_seq: int) -> str:
    """The ``Nats-Msg-Id`` of the replay of dead letter ``dead_seq`` (its sequence in the
    dead-letter stream): a second replay of one entry within the duplicate window is a
    duplicate, and no replay passes for the step's first submit."""
    return f"replay:{task_type}:{run_id}:{step_id}:{dead_seq}"


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
    """Split a task subject into (task_type, group, run_id, step_id), or None if malformed.

    The group is the plain group, without a placement.
    """
    parts = subject.split(".")
    if len(parts) != 6 or parts[0] != PREFIX or parts[1] != "task":
        return None
    return parts[2], parts[3].partition("~")[0], parts[4], parts[5]


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


# An RFC 7230 token: what a header name must be (the transport checks every header natrio
# publishes by the same rule; this copy serves the records below it, see _model).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def valid_header(name: str, value: str) -> bool:
    """Whether ``name: value`` is a header natrio can publish again: the name an RFC 7230
    token, the value a single line."""
    return _HEADER_NAME.fullmatch(name) is not None and "\r" not in value and "\n" not in value


def dead_input_name(task_seq: int) -> str:
    """The name in ``DEAD_INPUTS_BUCKET`` of the stored input of the dead letter of task
    ``task_seq`` (a sequence >= 1 in the task stream)."""
    return f"dlq-{task_seq}"


def valid_dead_input_ref(ref: str, task_seq: int) -> bool:
    """Whether ``ref`` may be the ``input_ref`` of a dead letter of task ``task_seq``: its
    own :func:`dead_input_name`, or for an entry without a task sequence (0) another
    ``dlq-`` name, never one of the form of an entry's that has one."""
    if task_seq:
        return ref == dead_input_name(task_seq)
    rest = ref.removeprefix("dlq-")
    return rest != ref and bool(rest) and not (rest.isascii() and rest.isdigit())
