"""The dead-letter stream seen from a client: entries read back, replayed and purged.

Anyone allowed to publish on ``natrio.dead.>`` can put anything there, so every message is
checked before natrio uses it (:meth:`DeadLetter.from_json`, and that it sits on its own
entry's subject); one that fails is skipped with a warning, never acted on.

The stream is read a page at a time, each page through a short-lived consumer whose
filter is in its create subject, so permissions can narrow whose entries a user reads
(docs/permissions.md). The pure parts (what a replay keeps, where it goes) take an entry
and return values; the rest talks to JetStream.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import deque
from contextlib import suppress
from typing import Any

import trio

from . import _wire as wire
from ._dispatch.edge import (
    MAX_RETRY_HEADER,
    ack_position,
    split_task_subject,
    valid_iteration,
)
from ._errors import ConfigurationError, JetStreamError, NatrioError, RequestTimeout
from ._history import DEFAULT_LIMIT, read_history
from ._jetstream import API, MESSAGE_NOT_FOUND, JetStream
from ._model import DeadLetter
from ._objects import ObjectStore, dead_input_owner
from ._retry import RetryPolicy
from ._routing.placement import partition_of
from ._transport import Message
from ._transport.protocol import valid_header_name

log = logging.getLogger("natrio.dead_letters")

#: JetStream's error number for a message delete that failed (a missing sequence included).
MESSAGE_DELETE_FAILED = 10043
# The headers of a task natrio makes anew for a replay (or drops: the deadline).
_RENEWED = frozenset({wire.H_REPLY, wire.H_SUBMITTED, wire.H_DEADLINE})
#: The header a dead-letter entry has in place of headers it could not keep.
H_HEADERS_CUT = "Natrio-Headers-Cut"
#: The most events of a step :func:`newer_task` reads; with more, it cannot tell.
MAX_STEP_EVENTS = DEFAULT_LIMIT


def read_entry(subject: str, data: bytes, seq: int) -> DeadLetter:
    """The entry stored as message ``seq`` on ``subject``; ValueError if it is not one.

    Besides the fields (:meth:`DeadLetter.from_json`), the subject must be the entry's
    own: natrio writes each entry on its task type, group, run and step, so an entry
    claiming another task type than its subject's is not one natrio wrote.
    """
    entry = DeadLetter.from_json(data, seq=seq)
    expected = wire.dead_subject(entry.task_type, entry.group, entry.run_id, entry.step_id)
    if subject != expected:
        raise ValueError(f"it is for {expected} but stored on another subject")
    return entry


def _position(reply: str) -> tuple[int, int | None] | None:
    """(stream sequence, messages pending after it, None if unreadable) from a consumer
    delivery's ack subject, or None if it is not one (:func:`ack_position`)."""
    position = ack_position(reply)
    if position is None:
        return None
    parts = reply.split(".")
    # The token after the consumer sequence and the timestamp (v1 has 9 tokens).
    return position[1], wire.decimal(parts[8] if len(parts) == 9 else parts[10])


async def read_page(
    js: JetStream, filter_subject: str, *, after: int, batch: int
) -> tuple[list[tuple[int, Message]], bool]:
    """Up to ``batch`` messages of the dead-letter stream on subjects matching the filter
    with a sequence above ``after``, as (sequence, message), oldest first, and whether more
    may follow.

    One consumer per page, deleted after it: nothing is held between pages, however long
    the caller takes over one, and a reconnect between pages costs nothing.
    """
    name = f"natrio_dlq_{secrets.token_hex(8)}"
    config = {
        "name": name,
        "filter_subject": filter_subject,
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": after + 1,
        "ack_policy": "none",
        "mem_storage": True,
        "num_replicas": 1,
        # Gone by itself soon, should the delete below not reach the server.
        "inactive_threshold": 10 * 1_000_000_000,
    }
    stream = wire.DEAD_STREAM
    info = await js.api(
        f"CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
        {"stream_name": stream, "config": config},
    )
    try:
        if not info.get("num_pending"):
            return [], False
        inbox = await js.conn.subscribe(js.conn.new_inbox())
        try:
            # A page is held in memory: bound its bytes too, but never below one message.
            max_bytes = max(4 * 1024 * 1024, 2 * js.conn.max_payload + 65536)
            body = {"batch": batch, "no_wait": True, "max_bytes": max_bytes}
            js.conn.publish_nowait(
                f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}",
                json.dumps(body).encode(),
                reply=inbox.subject,
            )
            found: list[tuple[int, Message]] = []
            with trio.move_on_after(js.timeout):
                while len(found) < batch:
                    msg = await inbox.receive()
                    position = _position(msg.reply)
                    if position is not None:
                        seq, pending = position
                        found.append((seq, msg))
                        if pending == 0:
                            return found, False
                        continue
                    status = msg.status
                    if status in ("404", "408"):  # nothing more for now
                        return found, False
                    if status == "409" and found:  # the page's bytes are used up
                        return found, True
                    raise JetStreamError(
                        int(status) if status and status.isdigit() else 0,
                        0,
                        f"reading {stream}: {msg.header('Description') or 'pull failed'}",
                    )
                return found, True
            raise RequestTimeout(f"no answer from {stream}'s consumer within {js.timeout:g} s")
        finally:
            with trio.CancelScope(shield=True):
                await inbox.unsubscribe()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(js.timeout), suppress(NatrioError):
            await js.delete_consumer(stream, name)


class DeadLetterReader:
    """The entries of the dead-letter stream, oldest first, read a page at a time.

    Made by :meth:`natrio.Client.dead_letters`; use it with ``async for``. Each entry has
    its stream sequence in :attr:`DeadLetter.seq`. The iteration ends at the stream's end
    as it is when the last page is read: entries added meanwhile may or may not be seen.

    Anyone allowed to publish on ``natrio.dead.>`` can store anything there: a message
    that is not a valid entry on its own subject is skipped, logged as a warning, and
    listed in :attr:`skipped`.
    """

    #: Entries read per page, at most (a page also stays within a few MiB).
    PAGE = 256

    def __init__(self, js: JetStream, filter_subject: str, *, page: int = PAGE) -> None:
        self.js = js
        self.filter_subject = filter_subject
        self.page = page
        #: (stream sequence, why) of every message skipped so far.
        self.skipped: list[tuple[int, str]] = []
        #: The stream sequence of the last message read, entry or skipped (0 before any).
        self.last_seq = 0
        self._entries: deque[DeadLetter] = deque()
        self._done = False

    def __aiter__(self) -> DeadLetterReader:
        return self

    async def __anext__(self) -> DeadLetter:
        while not self._entries:
            if self._done:
                raise StopAsyncIteration
            await self._read_page()
        return self._entries.popleft()

    async def _read_page(self) -> None:
        messages, more = await read_page(
            self.js, self.filter_subject, after=self.last_seq, batch=self.page
        )
        for seq, msg in messages:
            self.last_seq = max(self.last_seq, seq)
            try:
                self._entries.append(read_entry(msg.subject, msg.data, seq))
            except ValueError as exc:
                self.skipped.append((seq, str(exc)))
                log.warning(
                    "skipping message %d of %s on %r: not a dead-letter entry (%s)",
                    seq,
                    wire.DEAD_STREAM,
                    msg.subject[:200],
                    exc,
                )
        self._done = not more or not messages


async def entry_at(js: JetStream, seq: int) -> DeadLetter | None:
    """The entry that is message ``seq`` of the dead-letter stream, or None when there is
    no such message (removed, purged, expired); NatrioError if it is not a valid entry."""
    msg = await js.conn.request(
        f"{API}.DIRECT.GET.{wire.DEAD_STREAM}",
        json.dumps({"seq": seq}).encode(),
        timeout=js.timeout,
    )
    # A stored message always has the server's Nats-Sequence, a status reply never does:
    # a Status header its publisher set cannot pass for "not found".
    if msg.header("Nats-Sequence") is None:
        if msg.status == "404":
            return None
        raise JetStreamError(
            int(msg.status or 0) if (msg.status or "").isdigit() else 0,
            0,
            msg.header("Description") or f"reading message {seq} of {wire.DEAD_STREAM} failed",
        )
    try:
        if msg.header("Nats-Sequence") != str(seq):
            raise ValueError("the server answered with another message")
        return read_entry(msg.header("Nats-Subject") or "", msg.data, seq)
    except ValueError as exc:
        raise NatrioError(
            f"message {seq} of {wire.DEAD_STREAM} is not a dead-letter entry: {exc}"
        ) from None


async def remove_entry(js: JetStream, seq: int) -> bool:
    """Remove message ``seq`` from the dead-letter stream; False when it was gone already."""
    try:
        await js.api(f"STREAM.MSG.DELETE.{wire.DEAD_STREAM}", {"seq": seq, "no_erase": True})
    except JetStreamError as exc:
        if exc.err_code != MESSAGE_DELETE_FAILED:
            raise
        # The same error number covers every failed delete: gone is the one that is fine.
        with suppress(NatrioError):
            if await entry_at(js, seq) is None:
                return False
        raise
    return True


def input_name(entry: DeadLetter) -> str:
    """The name of ``entry``'s input in ``natrio_dead_inputs``; NatrioError when its
    ``input_ref`` is not the name a worker gives its task's input (``dlq-<task_seq>``):
    reading or deleting that would take another entry's."""
    ref = entry.input_ref
    if ref is None or not wire.valid_dead_input_ref(ref, entry.task_seq):
        raise NatrioError(
            f"dead letter {entry.seq} does not keep its input under its own name "
            f"({wire.dead_input_name(entry.task_seq)}) but {str(ref)[:100]!r}"
        )
    return ref


async def read_input(js: JetStream, entry: DeadLetter) -> bytes:
    """The input of ``entry``, inline or stored; NatrioError when the stored one is gone,
    damaged or another entry's."""
    if entry.input_ref is None:
        return entry.input
    name = input_name(entry)
    data = await ObjectStore(js, wire.DEAD_INPUTS_BUCKET).get(name, owner=dead_input_owner(entry))
    if data is None:
        raise NatrioError(f"the input of dead letter {entry.task_seq} ({name}) is gone")
    return data


async def delete_input(js: JetStream, entry: DeadLetter) -> None:
    """Delete the stored input of a removed entry, if it has one (best effort: it expires
    with the dead letters anyway; one that is another entry's is left alone)."""
    if entry.input_ref is None:
        return
    try:
        name = input_name(entry)
        await ObjectStore(js, wire.DEAD_INPUTS_BUCKET).delete(name, owner=dead_input_owner(entry))
    except NatrioError as exc:
        log.warning(
            "could not delete the stored input %r of dead letter %d (it expires with the "
            "dead letters): %s",
            entry.input_ref[:100],
            entry.seq,
            exc,
        )


async def purge(js: JetStream, filter_subject: str) -> int:
    """Remove every message of the dead-letter stream matching the filter, and the stored
    inputs of the entries among them; returns how many messages were removed.

    The entries are read first (for their stored inputs), then the stream is purged up
    to the last one read: entries added meanwhile stay.
    """
    reader = DeadLetterReader(js, filter_subject)
    removed: list[DeadLetter] = []
    async for entry in reader:
        if entry.input_ref is not None:
            removed.append(entry)
    if not reader.last_seq:
        return 0
    reply = await js.api(
        f"STREAM.PURGE.{wire.DEAD_STREAM}", {"filter": filter_subject, "seq": reader.last_seq + 1}
    )
    for entry in removed:
        await delete_input(js, entry)
    return int(reply.get("purged") or 0)


# -- replay ---------------------------------------------------------------------------


def replay_headers(entry: DeadLetter) -> tuple[dict[str, str], list[str]]:
    """The headers a replay of ``entry`` keeps, and what it leaves out as not valid.

    Kept: the submitter's own headers (those :meth:`natrio.Client.submit` accepts), the
    retry policy (re-encoded from the parsed one), the agent-loop iteration and the
    partition key. Not kept: JetStream's (``Nats-*``: the message id, expectations about
    the original publish), and natrio's reply subject, submit time and deadline, which a
    replay makes anew or drops.
    """
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in entry.headers.items():
        lower = name.lower()
        if lower.startswith("nats-") or name in _RENEWED:
            continue
        if name == H_HEADERS_CUT:
            # Cut when the task died: the replay cannot have them either.
            dropped.append(f"{value[:20]} headers the entry could not keep")
            continue
        if "\r" in value or "\n" in value:
            dropped.append(name)
        elif name == wire.H_RETRY:
            try:
                if len(value) > MAX_RETRY_HEADER:
                    raise ConfigurationError("too long")
                kept[name] = RetryPolicy.from_json(value).to_json()
            except (ConfigurationError, RecursionError):
                dropped.append(name)
        elif name == wire.H_ITERATION:
            if valid_iteration(value):
                kept[name] = value
            else:
                dropped.append(name)
        elif name == wire.H_KEY:
            if len(value) <= wire.MAX_KEY:
                kept[name] = value
            else:
                dropped.append(name)
        elif lower.startswith("natrio-") or not valid_header_name(name):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, dropped


def original_placement(entry: DeadLetter) -> str | None:
    """The placement of the task message that died (``p<k>``, ``t<claim>``, ``s<claim>``),
    read from the entry's subject, or None when it had none (or the subject is not the
    entry's task's)."""
    if not _of_step(entry, entry.subject):
        return None
    _, _, placement = entry.subject.split(".")[3].partition("~")
    if not placement:
        return None
    if placement[0] == "p":
        rest = placement[1:]
        if not rest.isdigit() or str(int(rest)) != rest or int(rest) >= wire.MAX_PARTITIONS:
            return None
        return wire.partition_placement(int(rest))
    return placement  # a claim: the edge's pattern is check_claim's rule


def _of_step(entry: DeadLetter, subject: str) -> bool:
    """Whether ``subject`` is a task subject of ``entry``'s step: its task type, run and
    step, in its group, plain or placed (a partition or a claim), as the edge takes them."""
    parts = split_task_subject(subject)
    if parts is None:
        return False
    task_type, token, run_id, step_id = parts
    return (task_type, token.partition("~")[0], run_id, step_id) == (
        entry.task_type,
        entry.group,
        entry.run_id,
        entry.step_id,
    )


def replay_placement(
    entry: DeadLetter, partitions: int | None, key: str | None = None
) -> str | None:
    """Where a replay of ``entry`` goes, given the task type's partition count now.

    The same claim (target) as the task that died, and the same partition while the
    count still has it; a partitioned type's task that had none (or one the count no
    longer has) goes to the partition of ``key``, else of its run id, as submit does.
    """
    placement = original_placement(entry)
    if partitions is None:
        return placement if placement is not None and placement[0] in "ts" else None
    if placement is not None and placement[0] == "p" and int(placement[1:]) < partitions:
        return placement
    return wire.partition_placement(partition_of(entry.run_id if key is None else key, partitions))


async def newer_task(js: JetStream, entry: DeadLetter) -> int | None:
    """The stream sequence of a task of ``entry``'s step newer than the one that died, or
    None: one waiting in the task stream, or one with events.

    A replay stored whose entry could not be removed (the process died in between) is
    such a task, and so is the step submitted again: either way, replaying the entry
    once more would run the step twice. Within the duplicate window the replay's message
    id already prevents that; this look covers the time after it.

    Anyone allowed to publish on natrio's subjects can store tasks and events, so what
    counts is checked (:func:`_of_step`, :func:`_newer_with_events`): a task in the
    entry's group (plain or placed), an event natrio could have written, for a task the
    task stream has had. The task stream is looked at first: a task leaves it only once
    its outcome's event is stored, so one that finishes between the two looks is seen
    in the second.
    """
    if not entry.task_seq:
        return None  # nothing to compare with
    waiting = await _newest_waiting(js, entry)
    if waiting is not None:
        return waiting
    return await _newer_with_events(js, entry)


async def _task_message(js: JetStream, request: dict[str, Any]) -> tuple[int, str] | None:
    """(sequence, subject) of the task-stream message a ``STREAM.MSG.GET`` request names,
    or None when there is none."""
    try:
        reply = await js.api(f"STREAM.MSG.GET.{wire.TASK_STREAM}", request)
    except JetStreamError as exc:
        if exc.err_code != MESSAGE_NOT_FOUND:
            raise
        return None
    message = reply.get("message") or {}
    seq, subject = message.get("seq"), message.get("subject")
    if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(subject, str):
        raise NatrioError(f"{wire.TASK_STREAM} answered a message get without its message")
    return seq, subject


async def _newest_waiting(js: JetStream, entry: DeadLetter) -> int | None:
    """The newest task of ``entry``'s step in the task stream, if newer than the one that
    died: on the step's subject in its group, or in one of the group's placements."""
    pattern = f"{wire.PREFIX}.task.{entry.task_type}.*.{entry.run_id}.{entry.step_id}"
    # The newest of any group token, in one look (a task moved into a partition is stored
    # there before it leaves the plain subject).
    newest = await _task_message(js, {"last_by_subj": pattern})
    if newest is None:
        return None
    seq, subject = newest
    if not _of_step(entry, subject):
        # Another group's (anyone may publish one) is newest: the group's own, one by one.
        seq = 0
        for subject in await js.subjects(wire.TASK_STREAM, pattern):
            if _of_step(entry, subject):
                found = await _task_message(js, {"last_by_subj": subject})
                seq = max(seq, found[0] if found is not None else 0)
    return seq if seq > entry.task_seq else None


async def _newer_with_events(js: JetStream, entry: DeadLetter) -> int | None:
    """The newest task of ``entry``'s step with events, if newer than the one that died.

    Every event of the step is read (the last one could be anyone's); those that count
    are natrio's as :func:`natrio._history.decode_event` reads them, of the entry's task
    type, for a task sequence the task stream has given out, whose task, while it is
    still there, is on the step's subject in its group.
    """
    history = await read_history(js, entry.run_id, entry.step_id, limit=MAX_STEP_EVENTS)
    if history.truncated:
        raise NatrioError(
            f"{entry.run_id}/{entry.step_id} has more than {MAX_STEP_EVENTS} events: cannot "
            "tell whether it was replayed already"
        )
    seqs = {
        event.task_seq
        for event in history.events
        if event.task_type == entry.task_type and event.task_seq > entry.task_seq
    }
    if not seqs:
        return None
    info = await js.stream_info(wire.TASK_STREAM)
    last = (info.get("state") or {}).get("last_seq")
    last = last if isinstance(last, int) and not isinstance(last, bool) else 0
    for seq in sorted(seqs, reverse=True):
        if seq > last:
            continue  # never a task of this stream
        task = await _task_message(js, {"seq": seq})
        if task is None or _of_step(entry, task[1]):
            return seq  # done and gone, or still there and the step's
    return None


async def check_duplicate(js: JetStream, entry: DeadLetter, task_seq: int) -> None:
    """Raise NatrioError unless task ``task_seq``, which the task stream named when it took
    ``entry``'s replay for a duplicate, can be its replay: a message with the replay's id
    is dropped on any subject, and anyone may publish one in another group."""
    task = await _task_message(js, {"seq": task_seq})
    if task is not None and not _of_step(entry, task[1]):
        raise NatrioError(
            f"dead letter {entry.seq} is not replayed: the task stream holds a message with "
            f"its replay's id on {task[1][:200]!r}, not a subject of its step"
        )


def warn_dropped(entry: DeadLetter, dropped: list[str]) -> None:
    """Say which headers of ``entry`` its replay goes without."""
    if dropped:
        log.warning(
            "replaying dead letter %d without headers that are not valid: %s",
            entry.seq,
            ", ".join(repr(name[:100]) for name in dropped[:20]),
        )


def warn_kept(entry: DeadLetter, task_seq: int) -> None:
    """Say why ``entry`` stays although its step has a newer task."""
    log.warning(
        "dead letter %d is not replayed: its step has a newer task (%d; replayed already, "
        "or submitted again), and the entry stays (purge it once that task is done)",
        entry.seq,
        task_seq,
    )


async def settle_replayed(js: JetStream, entry: DeadLetter, task_seq: int) -> None:
    """Remove ``entry`` once its replay (task ``task_seq``) is stored, and its stored input.

    A failure is logged, not raised: the replay is stored and will run, and replaying
    the entry again makes no second task (:func:`newer_task`).
    """
    try:
        removed = await remove_entry(js, entry.seq)
    except NatrioError as exc:
        log.warning(
            "dead letter %d is replayed (task %d) but its entry could not be removed: %s; "
            "replaying it again makes no second task",
            entry.seq,
            task_seq,
            exc,
        )
        return
    if removed:
        await delete_input(js, entry)
