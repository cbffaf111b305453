"""The JetStream API as JSON requests over the bridge: streams, consumers, publishes, KV reads."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from ._errors import JetStreamError, NatrioError, NoResponders, RequestTimeout
from ._transport import Connection, Message, Subscription
from ._wire import decimal

API = "$JS.API"

# JetStream error codes natrio reacts to.
STREAM_NOT_FOUND = 10059
STREAM_NAME_IN_USE = 10058
CONSUMER_NOT_FOUND = 10014
MESSAGE_NOT_FOUND = 10037
WRONG_LAST_SEQUENCE = 10071

log = logging.getLogger("natrio.jetstream")

# A KV watch's consumer sends an idle heartbeat this often (nats.go's ordered consumers
# use 5 s too); this many heartbeats of silence and the watch recreates its consumer.
WATCH_HEARTBEAT = 5.0
WATCH_MISSED_HEARTBEATS = 3

_NS = 1_000_000_000


def server_header(msg: Message, name: str) -> str:
    """The value the server gave header ``name`` of a message it stored (``Nats-Subject``,
    ``Nats-Sequence``, ...), or ``""`` when there is none.

    The server adds its own after any the publisher set: a publisher's copy of one comes
    first, joined to the server's with ``", "`` (as ``parse_headers`` joins a repeated
    header), so the server's is what follows the last ``", "``.
    """
    return (msg.header(name) or "").rpartition(", ")[2]


def short_lived_consumer(
    name: str, filter_subject: str, *, inactive: float = 10.0, **options: Any
) -> dict[str, Any]:
    """The config of a consumer natrio makes for a look or a watch and deletes after it:
    named ``name``, on ``filter_subject``, without acks, in server memory on one replica,
    and gone by itself ``inactive`` seconds after its last use, should the delete be lost.
    ``options`` add to it: where it starts (``deliver_policy`` with ``opt_start_seq`` or
    ``opt_start_time``), a ``deliver_subject`` for a push consumer, and so on."""
    return {
        "name": name,
        "filter_subject": filter_subject,
        **options,
        "ack_policy": "none",
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": int(inactive * _NS),
    }


class JetStream:
    """JetStream operations natrio needs, each a request to the ``$JS.API`` or a publish."""

    def __init__(self, conn: Connection, *, timeout: float = 5.0) -> None:
        self.conn = conn
        self.timeout = timeout

    async def api(self, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<subject>`` and return the JSON reply; JetStreamError on an error reply."""
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await self._request(f"{API}.{subject}", payload)
        except NoResponders:
            raise NatrioError(
                "JetStream is not enabled on this server (no responders on $JS.API); "
                "start nats-server with -js"
            ) from None
        return _reply(msg)

    async def _request(
        self, subject: str, payload: bytes, headers: Mapping[str, str] | None = None
    ) -> Message:
        return await self.conn.request(subject, payload, headers=headers, timeout=self.timeout)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Publish into a stream and wait for the stream's acknowledgement (its ``PubAck``).

        The reply has ``stream``, ``seq`` and ``duplicate`` (true when ``Nats-Msg-Id``
        matched an earlier message inside the duplicate window).
        """
        try:
            msg = await self._request(subject, payload, headers)
        except NoResponders:
            raise _no_stream(subject) from None
        return _reply(msg)

    def publish_nowait(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        on_stored: Callable[[NatrioError | None], None],
        subject_checked: bool = False,
    ) -> None:
        """Publish into a stream without waiting: ``on_stored(error)`` is called once,
        synchronously, with None once the stream stored it or with what went wrong
        (RequestTimeout, NoResponders, ConnectionClosed, JetStreamError).
        ``subject_checked``: the caller built ``subject`` from checked parts only."""

        def on_reply(msg: Message | None, error: BaseException | None) -> None:
            if msg is not None and msg.status == "503":
                error = _no_stream(subject)
            if error is None:
                assert msg is not None
                if _PUB_ACK.fullmatch(msg.data):
                    on_stored(None)
                    return
                try:
                    _reply(msg)
                except (JetStreamError, ValueError) as exc:
                    error = exc if isinstance(exc, NatrioError) else JetStreamError(0, 0, str(exc))
                else:
                    on_stored(None)
                    return
            on_stored(error if isinstance(error, NatrioError) else NatrioError(repr(error)))

        self.conn.request_nowait(
            subject,
            payload,
            headers=headers,
            timeout=self.timeout,
            on_reply=on_reply,
            subject_checked=subject_checked,
        )

    async def ensure_stream(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Create the stream, or update it to ``config`` when it exists."""
        name = config["name"]
        try:
            return await self.api(f"STREAM.CREATE.{name}", config)
        except JetStreamError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
        return await self.api(f"STREAM.UPDATE.{name}", config)

    async def stream_info(self, name: str, *, subjects_filter: str | None = None) -> dict[str, Any]:
        """The stream's config and state; with ``subjects_filter``, its subjects and counts."""
        body = {"subjects_filter": subjects_filter} if subjects_filter else None
        return await self.api(f"STREAM.INFO.{name}", body)

    async def subject_count(self, stream: str, subjects_filter: str) -> int:
        """How many subjects of ``stream`` match the filter, without listing them (the
        server's paging total, asked for past the last page)."""
        info = await self.api(
            f"STREAM.INFO.{stream}", {"subjects_filter": subjects_filter, "offset": 2**31}
        )
        total = info.get("total")
        return total if isinstance(total, int) and not isinstance(total, bool) else 0

    async def subjects(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Every subject in ``stream`` matching the filter, with its message count.

        The server answers with at most 100,000 subjects at a time; this pages through all.
        """
        found: dict[str, int] = {}
        offset = 0
        while True:
            body = {"subjects_filter": subjects_filter, "offset": offset}
            info = await self.api(f"STREAM.INFO.{stream}", body)
            page = (info.get("state") or {}).get("subjects") or {}
            # Counted by page, not by keys found: subjects that are not UTF-8 reach JSON
            # with U+FFFD in them, and distinct ones can become one key.
            offset += len(page)
            for subject, count in page.items():
                found[subject] = found.get(subject, 0) + count
            if not page or offset >= int(info.get("total") or 0):
                return found

    async def ensure_consumer(self, stream: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Create the durable consumer, or update it to ``config`` when it exists."""
        name = config["durable_name"]
        subject = f"CONSUMER.CREATE.{stream}.{name}"
        if "filter_subject" in config:
            # The filter in the subject too: then the server rejects a body that differs,
            # and permissions on this subject pin what the consumer may ever read.
            subject += f".{config['filter_subject']}"
        return await self.api(subject, {"stream_name": stream, "config": dict(config)})

    async def consumer_info(self, stream: str, name: str) -> dict[str, Any]:
        """The consumer's config and state (delivered, ack pending, waiting pulls)."""
        return await self.api(f"CONSUMER.INFO.{stream}.{name}")

    async def consumer_names(self, stream: str) -> list[str]:
        """The names of every consumer of ``stream`` (paged through)."""
        names: list[str] = []
        while True:
            page = await self.api(f"CONSUMER.NAMES.{stream}", {"offset": len(names)})
            batch = [str(name) for name in page.get("consumers") or []]
            names.extend(batch)
            if not batch or len(names) >= int(page.get("total") or 0):
                return names

    async def consumers(self, stream: str) -> list[dict[str, Any]]:
        """The info of every consumer of ``stream`` (paged through, 256 at a time)."""
        found: list[dict[str, Any]] = []
        while True:
            page = await self.api(f"CONSUMER.LIST.{stream}", {"offset": len(found)})
            batch = page.get("consumers") or []
            found.extend(batch)
            if not batch or len(found) >= int(page.get("total") or 0):
                return found

    async def delete_consumer(self, stream: str, name: str) -> None:
        """Delete a consumer; a missing one is not an error."""
        try:
            await self.api(f"CONSUMER.DELETE.{stream}.{name}")
        except JetStreamError as exc:
            if exc.err_code != CONSUMER_NOT_FOUND:
                raise

    @staticmethod
    def direct_get_subject(stream: str, subject: str) -> str:
        """The request subject of a direct get of the last message on ``subject``."""
        # The subject in the request subject (not the body), so that permissions can
        # scope who may read what.
        return f"{API}.DIRECT.GET.{stream}.{subject}"

    async def last_message(self, stream: str, subject: str) -> Message | None:
        """The last message stored on ``subject`` (a direct get), or None when there is none."""
        return _found(await self._request(self.direct_get_subject(stream, subject), b""))

    async def last_messages(
        self, stream: str, subjects_filter: str, *, limit: int = 1024
    ) -> list[Message] | None:
        """The last message of every subject matching the filter, in one batched direct
        get (nats-server 2.11+): one request, however many subjects. None when the
        server cannot answer it so (an older server, more than ``limit`` subjects, or
        no answer in time, as when permissions refuse the request): then read them one
        by one."""
        answer = await self._batched_get(
            stream,
            {"multi_last": [subjects_filter], "batch": limit},
            lambda found: len(found) > limit,
        )
        if answer is None:
            log.warning(
                "no answer to a batched get on %s within %g s (does the connection lack the "
                "permission to publish %s.DIRECT.GET.%s?); reading one subject at a time",
                stream,
                self.timeout,
                API,
                stream,
            )
            return None
        found, end = answer
        if end is None:
            return None  # more than limit
        status = end.status
        if status == "204":  # the end of the batch
            return found if end.header("Nats-Num-Pending") in (None, "0") else None
        if status == "404":
            return []  # no subject matches
        return None  # 400, 408, 413: not answered this way

    async def next_message(
        self, stream: str, subject: str, *, after: int
    ) -> tuple[int, bytes] | None:
        """The first message on ``subject`` with a sequence above ``after``: (seq, data), or None."""
        msg = _found(
            await self._request(
                f"{API}.DIRECT.GET.{stream}",
                json.dumps({"seq": after + 1, "next_by_subj": subject}).encode(),
            )
        )
        if msg is None:
            return None
        seq = decimal(server_header(msg, "Nats-Sequence"))
        if seq is None:
            raise NatrioError(f"a direct get on {stream} answered without a sequence")
        return seq, msg.data

    async def messages(
        self,
        stream: str,
        subjects_filter: str,
        *,
        after: int = 0,
        batch: int = 256,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> tuple[list[Message], bool]:
        """Messages on subjects matching the filter with a sequence above ``after``, oldest
        first, and whether more may follow.

        One batched direct get (nats-server 2.11+) answers up to ``batch`` of them, or
        about ``max_bytes`` (at least one, however large). A server that ignores the batch
        (older than 2.11) answers one message, returned with more = True: a caller that
        goes on from the last sequence then reads one at a time. Each message has the
        server's ``Nats-Subject``, ``Nats-Sequence`` and ``Nats-Time-Stamp`` headers after
        any its publisher set (joined with ``", "`` when the publisher set one too).
        """
        answer = await self._batched_get(
            stream,
            {
                "seq": after + 1,
                "next_by_subj": subjects_filter,
                "batch": batch,
                "max_bytes": max_bytes,
            },
            # A message without Nats-Num-Pending: a server that ignored the batch.
            lambda found: found[-1].header("Nats-Num-Pending") is None,
        )
        if answer is None:
            raise RequestTimeout(f"no answer to a direct get on {stream} in {self.timeout:g} s")
        found, end = answer
        if end is None:
            return found, True  # not a batched answer
        status = end.status
        if status == "204":  # the end of the batch
            return found, end.header("Nats-Num-Pending") not in (None, "0")
        if status == "404":
            return found, False  # nothing (more) matches
        raise JetStreamError(
            int(status) if status and status.isdigit() else 0,
            0,
            end.header("Description", "") or "direct get failed",
        )

    async def _batched_get(
        self, stream: str, body: Mapping[str, Any], stop: Callable[[list[Message]], bool]
    ) -> tuple[list[Message], Message | None] | None:
        """Send one batched direct get and collect its answer: the stored messages, oldest
        first, and the status reply that ended the batch, or None in its place when
        ``stop(found)``, asked after each message, ended it first. None when no answer
        ended it within the timeout.

        A stored message always carries the server's ``Nats-Sequence`` and a status reply
        never does: a publisher's own ``Status`` header cannot pass for the end of the batch.
        """
        inbox = await self.conn.subscribe(self.conn.new_inbox())
        try:
            self.conn.publish_nowait(
                f"{API}.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox.subject
            )
            found: list[Message] = []
            with trio.move_on_after(self.timeout):
                while True:
                    msg = await inbox.receive()
                    if msg.header("Nats-Sequence") is None:
                        return found, msg
                    found.append(msg)
                    if stop(found):
                        return found, None
            return None
        finally:
            with trio.CancelScope(shield=True):
                await inbox.unsubscribe()


class KeyValue:
    """A JetStream key-value bucket, read and written through its stream ``KV_<bucket>``."""

    def __init__(self, js: JetStream, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        #: Whether :meth:`items` asks for every entry in one request (until the server
        #: could not answer one).
        self.batched = True

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` under ``key``; returns the revision."""
        ack = await self.js.publish(self._subject(key), value)
        return int(ack["seq"])

    async def create(self, key: str, value: bytes) -> bool:
        """Store ``value`` under ``key`` only if the key has no value (never written, or
        deleted); False when it has one, which is left as it is."""
        expected = "0"
        for _ in range(2):
            try:
                await self.js.publish(
                    self._subject(key),
                    value,
                    headers={"Nats-Expected-Last-Subject-Sequence": expected},
                )
                return True
            except JetStreamError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
            # A deleted key keeps its delete marker: create over that, not over nothing.
            last = await self.js.last_message(self.stream, self._subject(key))
            if last is None or last.header("KV-Operation") not in ("DEL", "PURGE"):
                return False
            expected = last.header("Nats-Sequence") or "0"
        return False

    def direct_get_subject(self, key: str) -> str:
        """The request subject of a direct get of ``key``'s last entry."""
        return self.js.direct_get_subject(self.stream, self._subject(key))

    async def get(self, key: str) -> bytes | None:
        """The current value of ``key``, or None when absent, deleted or expired."""
        msg = await self.js.last_message(self.stream, self._subject(key))
        if msg is None or msg.header("KV-Operation") in ("DEL", "PURGE"):
            return None
        return msg.data

    @asynccontextmanager
    async def watch(
        self, key: str, *, heartbeat: float = WATCH_HEARTBEAT
    ) -> AsyncIterator[KeyWatch]:
        """The key's current value, then every update, as messages (a KV watch).

        An ephemeral consumer delivers the last message on the key and everything after
        it, so nothing falls between reading and watching (a plain subscription plus a
        read can miss a put that the stream stores after the read was answered). Deleted
        or purged values arrive with a ``KV-Operation`` header. The consumer is kept
        alive while the watch is iterated (see :class:`KeyWatch`); it is deleted when the
        block ends.
        """
        watch = KeyWatch(self, key, heartbeat)
        try:
            await watch._open()
            yield watch
        finally:
            with trio.CancelScope(shield=True):
                await watch._close()

    async def delete(self, key: str) -> None:
        """Remove ``key`` and its history."""
        await self.js.publish(
            self._subject(key), b"", headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
        )

    async def keys(self) -> list[str]:
        """Keys that currently have a value."""
        prefix = f"$KV.{self.bucket}."
        subjects = await self.js.subjects(self.stream, prefix + ">")
        return sorted(s[len(prefix) :] for s in subjects)

    async def items(self) -> dict[str, bytes]:
        """Every key with a value, and the value (in one request where the server can)."""
        prefix = f"$KV.{self.bucket}."
        batch = await self.js.last_messages(self.stream, prefix + ">") if self.batched else None
        if batch is None:
            self.batched = False
        else:
            return {
                subject[len(prefix) :]: msg.data
                for msg in batch
                if (subject := server_header(msg, "Nats-Subject")).startswith(prefix)
                and msg.header("KV-Operation") not in ("DEL", "PURGE")
            }
        out: dict[str, bytes] = {}
        for key in await self.keys():
            value = await self.get(key)
            if value is not None:
                out[key] = value
        return out


class KeyWatch:
    """The entries of one KV key as they come, made by :meth:`KeyValue.watch`.

    Iterate it (or await :meth:`receive`): first the key's current entry, if it has one,
    then every later one. An entry is the stream's message; a deleted or purged value is
    one with a ``KV-Operation`` header. Heartbeats and flow-control requests (status 100)
    are dealt with here and never handed on.

    Its consumer is an ephemeral push consumer in server memory, which a server restart
    loses for good, so the watch re-creates it, as nats.go's ordered consumer does: after
    a reconnect, after a gap in the consumer sequence (seen on an entry or an idle
    heartbeat), and after ``WATCH_MISSED_HEARTBEATS`` heartbeat intervals with nothing
    from it. The new consumer, on a new inbox, delivers the key's current entry again
    (deliver policy last per subject) and everything after it: entries overwritten in
    between are skipped (the current one is what counts), and the entry last handed on
    is not handed on twice. This happens in the task that iterates, while it waits for
    the next entry; there is no background task.
    """

    def __init__(self, kv: KeyValue, key: str, heartbeat: float) -> None:
        if heartbeat <= 0:
            raise ValueError(f"heartbeat must be > 0, got {heartbeat!r}")
        self.js = kv.js
        self.stream = kv.stream
        self.subject = kv._subject(key)
        self.heartbeat = heartbeat
        self.silence = heartbeat * WATCH_MISSED_HEARTBEATS
        self.recreated = 0
        self._entries: deque[Message] = deque()
        self._wakeup = trio.Event()
        self._inbox: Subscription | None = None
        self._name: str | None = None
        # Messages for an inbox given up are ignored, whatever is still on its way.
        self._generation = 0
        self._next_seq = 1  # the consumer sequence the next entry must have
        self._last_entry: str | None = None  # stream sequence and time of the last one kept
        self._stale: str | None = None  # why the consumer must be replaced
        self._last_activity = 0.0
        self._remove_listener: Callable[[], None] | None = None
        self._closed = False

    def __aiter__(self) -> KeyWatch:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """The next entry, as soon as there is one; ClosedResourceError once the watch ended."""
        while not self._entries:
            if self._closed:
                raise trio.ClosedResourceError("the watch has ended")
            deadline = self._last_activity + self.silence
            if self._stale is None and trio.current_time() >= deadline:
                self._stale = f"nothing from its consumer for {self.silence:g} s"
            if self._stale is not None:
                await self._recreate()
                continue
            self._wakeup = trio.Event()
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
        return self._entries.popleft()

    # -- the consumer -----------------------------------------------------------------

    async def _open(self) -> None:
        self._remove_listener = self.js.conn.add_reconnect_listener(self._on_reconnect)
        await self._create()

    async def _close(self) -> None:
        self._closed = True
        if self._remove_listener is not None:
            self._remove_listener()
        # Best effort: it expires by itself anyway (inactive threshold).
        await self._drop(wait=self.js.conn.connected)

    async def _create(self) -> None:
        conn = self.js.conn
        self._generation += 1
        generation = self._generation
        self._next_seq = 1
        self._stale = None
        self._last_activity = trio.current_time()

        def on_message(msg: Message) -> None:
            if generation == self._generation:
                self._on_message(msg)

        self._inbox = await conn.subscribe(conn.new_inbox(), on_message=on_message)
        self._name = name = f"watch_{secrets.token_hex(8)}"
        config = short_lived_consumer(
            name,
            self.subject,
            deliver_subject=self._inbox.subject,
            deliver_policy="last_per_subject",
            idle_heartbeat=int(self.heartbeat * _NS),
            # Gone by itself soon after the watcher is (a crash leaves nothing behind).
            inactive=30.0,
        )
        await self.js.api(
            f"CONSUMER.CREATE.{self.stream}.{name}.{self.subject}",
            {"stream_name": self.stream, "config": config},
        )

    async def _drop(self, *, wait: bool) -> None:
        """Give up the inbox and delete the consumer, waiting for the answer or not."""
        self._generation += 1
        inbox, name = self._inbox, self._name
        self._inbox = self._name = None
        if inbox is not None:
            with trio.CancelScope(shield=True):  # quick; cut short, it would linger
                await inbox.unsubscribe()
        if name is None:
            return
        if wait:
            with trio.move_on_after(self.js.timeout), suppress(NatrioError):
                await self.js.delete_consumer(self.stream, name)
        else:
            with suppress(NatrioError):
                self.js.conn.request_nowait(
                    f"{API}.CONSUMER.DELETE.{self.stream}.{name}",
                    b"",
                    timeout=self.js.timeout,
                    on_reply=lambda msg, error: None,
                )

    async def _recreate(self) -> None:
        conn = self.js.conn
        log.info("watch on %s: %s; recreating its consumer", self.subject, self._stale)
        await self._drop(wait=False)
        delay = 0.1
        while True:
            if not conn.connected and not conn.closed:
                # Nothing to do until the reconnect listener wakes us.
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            try:
                await self._create()
            except NatrioError as exc:
                if conn.closed:
                    raise
                log.warning("watch on %s: recreating its consumer failed: %r", self.subject, exc)
                await self._drop(wait=False)
                # A reconnect meanwhile cuts the wait short.
                self._wakeup = trio.Event()
                with trio.move_on_after(delay):
                    await self._wakeup.wait()
                delay = min(delay * 2, 5.0)
            else:
                self.recreated += 1
                return

    # -- what arrives (synchronously, from the connection's read loop) -----------------

    def _mark_stale(self, reason: str) -> None:
        if self._stale is None:
            self._stale = reason
        self._wakeup.set()

    def _on_reconnect(self) -> None:
        self._mark_stale("the connection reconnected")

    def _on_message(self, msg: Message) -> None:
        self._last_activity = trio.current_time()
        status = msg.status
        if status is None:
            self._on_entry(msg)
        elif status == "100":
            # An idle heartbeat, or (with a reply subject) a flow-control request.
            for reply in (msg.reply, msg.header("Nats-Consumer-Stalled")):
                if reply:
                    with suppress(NatrioError, ValueError):
                        self.js.conn.publish_nowait(reply)
            last = decimal(msg.header("Nats-Last-Consumer"))
            if last is not None and last != self._next_seq - 1:
                self._mark_stale(f"missed entries (the server sent {last})")
        elif status == "409":
            self._mark_stale(f"the server ended it: {msg.header('Description')}")
        else:
            log.debug("watch on %s: ignoring status %s", self.subject, status)

    def _on_entry(self, msg: Message) -> None:
        parsed = _delivery(msg.reply)
        if parsed is not None:
            consumer_seq, identity = parsed
            if consumer_seq != self._next_seq:
                self._mark_stale(f"entry {consumer_seq} came where {self._next_seq} was due")
                return
            self._next_seq += 1
            if identity == self._last_entry:
                return  # handed on already, read again by a recreated consumer
            self._last_entry = identity
        self._entries.append(msg)
        self._wakeup.set()


def _delivery(reply: str) -> tuple[int, str] | None:
    """The consumer sequence and the stream sequence and time from a push delivery's ack
    subject, or None if it is none.

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``;
    v2 adds domain and account hash after ``$JS.ACK`` and a random token at the end.
    """
    parts = reply.split(".")
    if len(parts) == 9:
        parts[2:2] = ["", ""]
    if (
        len(parts) < 11
        or parts[0] != "$JS"
        or parts[1] != "ACK"
        or not (parts[8].isascii() and parts[8].isdigit())
    ):
        return None
    return int(parts[8]), f"{parts[7]}@{parts[9]}"


def _found(msg: Message) -> Message | None:
    """A direct get's answer: the message, None for 404, JetStreamError for another status."""
    status = msg.status
    if status == "404":
        return None
    if status is not None and status != "200":
        raise JetStreamError(int(status), 0, msg.header("Description", "") or "direct get failed")
    return msg


def _no_stream(subject: str) -> NoResponders:
    return NoResponders(
        f"no stream answered for {subject}: it is not provisioned (run "
        "natrio.provision()), or its stream has no leader right now"
    )


# A plain PubAck as nats-server writes one (a stream name has no quotes or backslashes),
# read without the JSON decoder: there is one per stored event. Anything else is JSON.
_PUB_ACK = re.compile(rb'\{"stream":"([^"\\]+)","seq":(\d{1,20})\}')


def _reply(msg: Message) -> dict[str, Any]:
    """The JSON of a JetStream API reply; JetStreamError when it is an error reply."""
    plain = _PUB_ACK.fullmatch(msg.data)
    if plain is not None:
        stream, seq = plain.groups()
        return {"stream": stream.decode(), "seq": int(seq)}
    reply: dict[str, Any] = json.loads(msg.data)
    error = reply.get("error")
    if error:
        raise JetStreamError(
            int(error.get("code", 0)),
            int(error.get("err_code", 0)),
            str(error.get("description", "")),
        )
    return reply
