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
import re
import secrets
from collections import deque
from contextlib import suppress

import trio

from . import _wire as wire
from ._dispatch.edge import MAX_KEY, MAX_RETRY_HEADER
from ._errors import ConfigurationError, JetStreamError, NatrioError, RequestTimeout
from ._jetstream import API, MESSAGE_NOT_FOUND, JetStream
from ._model import DeadLetter
from ._objects import ObjectStore
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
# A Natrio-Iteration the wire edge accepts (_dispatch.edge).
_ITERATION = re.compile(r"[1-9][0-9]{0,8}")
# A placed task's group token: the group, ``~``, and ``p<k>``, ``t<claim>`` or ``s<claim>``.
_PLACED = re.compile(r"([A-Za-z0-9_-]{1,64})~([pts])([A-Za-z0-9_-]{1,64})")
_DIGITS = re.compile(r"[0-9]{1,20}")


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


def _position(reply: str) -> tuple[int, int] | None:
    """(stream sequence, messages pending after it) from a consumer delivery's ack subject.

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``;
    v2 adds domain and account hash after ``$JS.ACK`` and a random token at the end.
    """
    parts = reply.split(".")
    if parts[:2] != ["$JS", "ACK"]:
        return None
    if len(parts) == 9:
        seq, pending = parts[5], parts[8]
    elif len(parts) >= 12:
        seq, pending = parts[7], parts[10]
    else:
        return None
    if not (_DIGITS.fullmatch(seq) and _DIGITS.fullmatch(pending)):
        return None
    return int(seq), int(pending)


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
                        if not pending:
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


async def delete_input(js: JetStream, entry: DeadLetter) -> None:
    """Delete the stored input of a removed entry, if it has one (best effort: it expires
    with the dead letters anyway)."""
    if entry.input_ref is None:
        return
    try:
        await ObjectStore(js, wire.DEAD_INPUTS_BUCKET).delete(entry.input_ref)
    except NatrioError as exc:
        log.warning(
            "could not delete the stored input %r of dead letter %d (it expires with the "
            "dead letters): %s",
            entry.input_ref,
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
            if _ITERATION.fullmatch(value):
                kept[name] = value
            else:
                dropped.append(name)
        elif name == wire.H_KEY:
            if len(value) <= MAX_KEY:
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
    parts = entry.subject.split(".")
    if (
        len(parts) != 6
        or parts[:2] != [wire.PREFIX, "task"]
        or (parts[2], parts[4], parts[5]) != (entry.task_type, entry.run_id, entry.step_id)
    ):
        return None
    match = _PLACED.fullmatch(parts[3])
    if match is None or match[1] != entry.group:
        return None
    kind, rest = match[2], match[3]
    if kind == "p":
        if not rest.isdigit() or str(int(rest)) != rest or int(rest) >= wire.MAX_PARTITIONS:
            return None
        return wire.partition_placement(int(rest))
    return kind + rest  # a claim: the pattern is check_claim's rule


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
    """
    if not entry.task_seq:
        return None  # nothing to compare with
    event = await js.last_message(
        wire.EVENT_STREAM, wire.event_subject(entry.task_type, entry.run_id, entry.step_id, "*")
    )
    if event is not None:
        text = event.header(wire.H_TASK_SEQ) or ""
        if _DIGITS.fullmatch(text) and int(text) > entry.task_seq:
            return int(text)
    # Any group token: the task may have been placed in a partition or for a claim.
    tasks = f"{wire.PREFIX}.task.{entry.task_type}.*.{entry.run_id}.{entry.step_id}"
    try:
        reply = await js.api(f"STREAM.MSG.GET.{wire.TASK_STREAM}", {"last_by_subj": tasks})
    except JetStreamError as exc:
        if exc.err_code != MESSAGE_NOT_FOUND:
            raise
        return None
    seq = (reply.get("message") or {}).get("seq")
    if isinstance(seq, int) and seq > entry.task_seq:
        return seq
    return None


def warn_dropped(entry: DeadLetter, dropped: list[str]) -> None:
    """Say which headers of ``entry`` its replay goes without."""
    if dropped:
        log.warning(
            "replaying dead letter %d without headers that are not valid: %s",
            entry.seq,
            ", ".join(repr(name[:100]) for name in dropped[:20]),
        )


async def settle_replayed(js: JetStream, entry: DeadLetter, task_seq: int | None) -> None:
    """Remove ``entry`` once its replay (task ``task_seq``) is stored, and its stored input.

    A failure is logged, not raised: the replay is stored and will run, and replaying
    the entry again removes it without a second task (:func:`newer_task`).
    """
    try:
        removed = await remove_entry(js, entry.seq)
    except NatrioError as exc:
        log.warning(
            "dead letter %d is replayed (task %s) but its entry could not be removed: %s; "
            "replaying it again removes it and makes no second task",
            entry.seq,
            task_seq,
            exc,
        )
        return
    if removed:
        await delete_input(js, entry)
