"""The connection: a NATS connection with Trio-native methods, over the nats-py link.

What keeps it fast (docs/performance.md): messages go from nats-py's read loop to natrio's
subscriptions through lanes, plain functions called at once, and on into Trio without
awaiting; publishes queue on the Trio side and are encoded and written to the socket once
per scheduler pass, never once per message; request timeouts are swept, not a cancel
scope each. Every publish is checked against the protocol's limits before it is queued
(:mod:`.protocol`), so no value can make the server close the connection.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._asyncio.nats_client import NatsLink, open_link
from .._errors import (
    ConfigurationError,
    ConnectionClosed,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
)
from .._util import single_error
from .protocol import (
    MAX_SUBJECTS_LENGTH,
    Headers,
    Message,
    check_subject,
    encode_command,
    header_block,
    redact,
)

__all__ = ["DEFAULT_URL", "Connection", "Reply", "Subscription", "connect"]

DEFAULT_URL = "nats://127.0.0.1:4222"

# How often timed-out requests are looked for: the precision of request timeouts.
_SWEEP_INTERVAL = 0.05

log = logging.getLogger("natrio.connection")


class Reply:
    """Where a reply (or the error that stopped the request) lands for one Trio caller."""

    __slots__ = ("__weakref__", "deadline", "error", "event", "message", "subject", "timeout")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None
        self.error: BaseException | None = None
        # When the sweeper fails it (Trio time; inf: never), and what its error says.
        self.deadline = math.inf
        self.subject = ""
        self.timeout = 0.0

    def settle(self) -> None:
        """The reply (or error) is in: wake the caller."""
        self.event.set()


class _CallbackReply:
    """Where a reply lands for :meth:`Connection.request_nowait`: a function called with it."""

    __slots__ = (
        "__weakref__",
        "callback",
        "deadline",
        "error",
        "message",
        "settled",
        "subject",
        "timeout",
    )

    def __init__(self, callback: Callable[[Message | None, BaseException | None], None]) -> None:
        self.callback = callback
        self.message: Message | None = None
        self.error: BaseException | None = None
        self.settled = False
        self.deadline = math.inf
        self.subject = ""
        self.timeout = 0.0

    def settle(self) -> None:
        if self.settled:
            return  # the callback runs once, whatever else comes
        self.settled = True
        try:
            self.callback(self.message, self.error)
        except Exception:
            # It runs inside the read loop or the sweeper: neither may die of it.
            log.exception("a reply callback failed")


_Waiter = Reply | _CallbackReply

# An outbox item: subject, payload, reply, encoded header block (b"" for none), and the
# waiter to fail if it cannot be sent.
_Item = tuple[str, bytes, str, bytes, _Waiter | None] | bytes


class Subscription:
    """Messages on one subject, received in Trio.

    Iterate with ``async for``; :meth:`drain` removes interest but delivers everything
    the server had already sent, then ends the iteration.
    """

    def __init__(
        self,
        conn: Connection,
        subject: str,
        receive_channel: trio.MemoryReceiveChannel[Message],
        send_channel: trio.MemorySendChannel[Message],
        sid: int,
    ) -> None:
        self.subject = subject
        self._conn = conn
        self._receive = receive_channel
        self._send = send_channel
        self._sid = sid
        self._closed = False

    async def receive(self) -> Message:
        """The next message; raises ``trio.EndOfChannel`` after :meth:`drain` or :meth:`unsubscribe`."""
        return await self._receive.receive()

    def receive_nowait(self) -> Message:
        """The next message if one is waiting, else raises ``trio.WouldBlock``."""
        return self._receive.receive_nowait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def drain(self) -> None:
        """Remove interest, wait until every message the server sent has arrived, then end.

        Cancelled part-way, the subscription stays open, so :meth:`unsubscribe` still
        removes it (a subscription marked closed too early would be renewed by nats-py on
        every reconnect).
        """
        if self._closed:
            return
        # nats-py writes the UNSUB itself: what natrio queued (the SUB among it) goes first.
        self._conn.send_now()
        await self._conn._link.drain(self._sid)
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        """Remove interest at once; messages still on their way are dropped."""
        if self._closed:
            return
        self._closed = True
        self._send.close()
        self._conn._own_inboxes.pop(self._sid, None)
        command = self._conn._link.unsubscribe(self._sid)
        if command is not None and not self._conn._closed:
            self._conn._enqueue(command)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            await self.unsubscribe()


class Connection:
    """A NATS connection with Trio-native methods. Make one with :func:`natrio.connect`."""

    def __init__(self, link: NatsLink, url: str) -> None:
        self._link = link
        self.url = url
        self.inbox_prefix = link.inbox_prefix
        # Read on every publish; the server's INFO sets it, so it is read again on reconnect.
        self._max_payload = link.max_payload
        self._closed_for_good = trio.Event()
        self._outbox: list[_Item] = []
        self._drainer_idle = True
        self._wake = trio.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._expected: weakref.WeakValueDictionary[str, Reply] = weakref.WeakValueDictionary()
        self._tokens = itertools.count()
        self._mux_prefix = ""
        # This connection's own inboxes (subscriptions under the inbox prefix), wildcards
        # cut off: where no one else's reply may be steered.
        self._own_inboxes: dict[int, str] = {}
        self._mux_length = 0
        self._sweep_wake = trio.Event()
        self._sweeper_idle = True
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._disconnect_listeners: list[Callable[[], None]] = []
        self._closed = False
        self.reconnects = 0

    # -- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection has been closed (by :meth:`aclose` or for good by nats-py)."""
        return self._closed or self._link.closed

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (it may be reconnecting)."""
        return self._link.connected

    @property
    def max_payload(self) -> int:
        """The largest payload the server accepts, in bytes."""
        return self._max_payload

    @property
    def server_version(self) -> str:
        """The version the connected server reports."""
        return self._link.server_version

    def new_inbox(self) -> str:
        """A unique subject to receive replies on."""
        return self._link.new_inbox()

    def add_reconnect_listener(
        self, listener: Callable[[], None], *, disconnects: bool = False
    ) -> Callable[[], None]:
        """Call ``listener()`` (synchronously, in Trio) after every reconnect (and, with
        ``disconnects``, as soon as the link is found lost); returns a remover."""
        lists = [self._reconnect_listeners]
        if disconnects:
            lists.append(self._disconnect_listeners)
        for listeners in lists:
            listeners.append(listener)

        def remove() -> None:
            for listeners in lists:
                if listener in listeners:
                    listeners.remove(listener)

        return remove

    def statistics(self) -> dict[str, int]:
        """Counters: messages and bytes in and out, reconnects, queued publishes."""
        stats = self._link.stats()
        stats["outbox"] = len(self._outbox)
        stats["pending_requests"] = len(self._waiters)
        return stats

    # -- publishing -------------------------------------------------------------------

    def _check(
        self,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        subject_checked: bool = False,
    ) -> bytes:
        # Validates a publish and returns its encoded header block (b"" for none), so that
        # header names and values are walked once.
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        if not subject_checked:
            check_subject(subject)
        if isinstance(headers, Headers):
            block = headers.block
        else:
            block = header_block(headers) if headers else b""
        size = len(payload) + len(block)
        if size > self._max_payload:
            raise PayloadTooLarge(
                f"message of {size} bytes (payload and headers) exceeds the server's "
                f"max_payload of {self._max_payload} bytes (subject {subject[:100]})"
            )
        return block

    def _enqueue(self, item: _Item) -> None:
        self._outbox.append(item)
        if self._drainer_idle:
            self._drainer_idle = False
            self._wake.set()

    def publish_nowait(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a publish; it reaches the socket with the next batch, in order.

        Raises PayloadTooLarge at once when the payload is over the server's limit and
        ConnectionClosed once the connection is closed. A failure to send later (the
        connection lost while nats-py's reconnect buffer is full) is logged.
        """
        block = self._check(subject, payload, headers)
        if reply:
            check_subject(reply, kind="reply subject", wildcards=False)
            if len(subject) + len(reply) > MAX_SUBJECTS_LENGTH:
                raise ValueError("subject and reply subject are too long together")
        self._enqueue((subject, payload, reply, block, None))

    def publish_checked_nowait(self, subject: str, payload: bytes) -> None:
        """:meth:`publish_nowait` to a subject the caller has already checked with
        ``check_subject`` (an ack subject, checked when its message arrived)."""
        self._enqueue((subject, payload, "", self._check(subject, payload, None, True), None))

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a cancel scope per request costs more
    ) -> Message:
        """Publish with a reply subject and return the first reply.

        Without ``timeout`` it waits as long as the caller's cancel scope allows; with one,
        it raises RequestTimeout after about that many seconds (checked every 50 ms, which
        is far cheaper per request than a cancel scope). Raises NoResponders (nobody
        subscribed; for a JetStream publish, no stream holds the subject),
        PayloadTooLarge or ConnectionClosed.
        """
        waiter = Reply()
        token = self._send_request(subject, payload, headers, timeout, waiter)
        self._send_outbox()  # the caller waits for the answer: no reason to wait for the pass
        try:
            await waiter.event.wait()
        finally:
            self._waiters.pop(token, None)
        if waiter.error is not None:
            raise waiter.error
        message = waiter.message
        assert message is not None
        if message.status == "503":
            raise NoResponders(f"no responders on {subject}")
        return message

    def request_nowait(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float,
        on_reply: Callable[[Message | None, BaseException | None], None],
        subject_checked: bool = False,
    ) -> None:
        """Publish with a reply subject; ``on_reply(message, error)`` gets the first reply.

        It is called synchronously, exactly once: with the reply, or with RequestTimeout
        after about ``timeout`` seconds, or with ConnectionClosed. It must not block.
        Raises PayloadTooLarge or ConnectionClosed at once when the publish is refused.
        ``subject_checked``: the caller built ``subject`` from checked parts only.
        """
        self._send_request(
            subject, payload, headers, timeout, _CallbackReply(on_reply), subject_checked
        )

    def _send_request(
        self,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        timeout: float | None,
        waiter: _Waiter,
        subject_checked: bool = False,
    ) -> str:
        block = self._check(subject, payload, headers, subject_checked)
        # "r" marks the replies to natrio's own requests (PubAcks, API answers), which no
        # one may be steered to answer (is_own_inbox); expected replies are plain numbers.
        token = f"r{next(self._tokens)}"
        self._waiters[token] = waiter
        if timeout is not None:
            if self._sweeper_idle:
                self._sweeper_idle = False
                self._sweep_wake.set()
            waiter.deadline = trio.current_time() + timeout
            waiter.subject = subject
            waiter.timeout = timeout
        self._enqueue((subject, payload, self._mux_prefix + token, block, waiter))
        return token

    async def _expire_requests(self) -> None:
        # Fails requests whose timeout passed, looking at the unanswered ones every
        # interval while there are any (a few hundred at most in flight, where a heap of
        # deadlines costs every request a push and a pop).
        while True:
            await self._sweep_wake.wait()
            self._sweep_wake = trio.Event()
            while self._waiters:
                await trio.sleep(_SWEEP_INTERVAL)
                # Read each time: aclose() replaces the dict.
                waiters = self._waiters
                now = trio.current_time()
                expired = [token for token, waiter in waiters.items() if waiter.deadline <= now]
                for token in expired:
                    waiter = waiters.pop(token)
                    waiter.error = RequestTimeout(
                        f"no reply to a request on {waiter.subject} within {waiter.timeout} s"
                    )
                    waiter.settle()
            self._sweeper_idle = True

    async def flush(self) -> None:
        """Wait until every queued publish has been sent and the server has seen it.

        Bound it with a cancel scope; nats-py's own flush gives up after 10 s with
        RequestTimeout.
        """
        if self._closed:
            return
        self._send_outbox()
        await self._link.flush(10)

    def send_now(self) -> None:
        """Hand queued publishes to the socket now rather than at the end of the scheduler pass.

        For a caller about to wait for something those publishes lead to: it saves the
        pass's worth of latency. Publishes keep their order either way.
        """
        if self._outbox and not self._closed:
            self._send_outbox()

    async def _drain_outbox(self) -> None:
        # Sends what publishers queued, once per wake-up: the wake-up comes after every
        # task that was ready has run, so a batch collects all they published.
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._send_outbox()

    def _send_outbox(self) -> None:
        # Encodes the queued publishes and writes them to the socket as one block, from
        # Trio, without a hop through an asyncio task: nats-py's publish() per message and
        # its flusher task were the largest costs of a publish, and of a round trip's latency.
        self._drainer_idle = True
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        # A SUB or UNSUB comes as its encoded command, in order with the publishes.
        commands = [
            item if isinstance(item, bytes) else encode_command(item[0], item[2], item[1], item[3])
            for item in batch
        ]
        error = self._link.write(commands, sum(map(len, commands)))
        if error is None:
            return
        log.warning("could not send %d message(s): %s", len(commands), error)
        for item in batch:
            if isinstance(item, bytes):
                continue
            _, _, reply, _, waiter = item
            if waiter is not None:
                # Answered now, so neither a reply nor the sweeper settles it again.
                self._waiters.pop(reply[self._mux_length :], None)
                waiter.error = ConnectionClosed(f"could not publish: {error}")
                waiter.settle()

    # -- subscribing ------------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str = "",
        on_message: Callable[[Message], None] | None = None,
    ) -> Subscription:
        """Subscribe to ``subject`` (optionally in a queue group); messages arrive in Trio.

        Iterate the subscription, or pass ``on_message``: then each message is handed to
        it synchronously the moment it is read, which saves a task switch per message.
        ``on_message`` must not block; an exception it raises is logged and the message
        dropped.
        """
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        send, receive = trio.open_memory_channel[Message](math.inf)
        handle = on_message or send.send_nowait

        def deliver(
            subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
        ) -> None:
            # try/except, not contextlib.suppress: a context manager per message costs more.
            try:  # noqa: SIM105
                handle(
                    Message(
                        subject.decode(errors="surrogateescape"),
                        data,
                        reply.decode(errors="surrogateescape"),
                        headers,
                    )
                )
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the subscription is closing

        sid, command = self._link.subscribe(subject, queue, deliver)
        # Written now, not with the scheduler pass: nats-py's own writes (a drain's UNSUB,
        # a flush's PING) must not pass it.
        self._enqueue(command)
        self.send_now()
        inbox = _inbox_of(subject, self.inbox_prefix)
        if inbox is not None:
            self._own_inboxes[sid] = inbox
        return Subscription(self, subject, receive, send, sid)

    def is_own_inbox(self, subject: str) -> bool:
        """Whether ``subject`` is one of this connection's own inboxes, or under one: where
        its requests' replies, pulls and watches arrive. The replies it expects from others
        (:meth:`expect_reply`, a client's waiting task) are not among them."""
        if self._mux_prefix and subject.startswith(self._mux_prefix + "r"):
            return True
        return any(
            subject == inbox or subject.startswith(inbox + ".")
            for inbox in self._own_inboxes.values()
        )

    def expect_reply(self) -> tuple[str, Reply]:
        """A reply subject and the ``Reply`` its first message will land in.

        For replies that come later from someone else (a worker answering a client).
        Only a weak reference is kept: drop the Reply and its subject is forgotten.
        """
        token = str(next(self._tokens))
        reply = Reply()
        self._expected[token] = reply
        return self._mux_prefix + token, reply

    def _on_reply(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        token = subject[self._mux_length :].decode(errors="replace")
        waiter = (
            self._waiters.pop(token, None) if token[:1] == "r" else self._expected.pop(token, None)
        )
        if waiter is not None:
            waiter.message = Message(
                subject.decode(errors="replace"), data, reply.decode(errors="replace"), headers
            )
            waiter.settle()

    async def _start(self) -> None:
        self._mux_prefix = self.new_inbox() + "."
        self._mux_length = len(self._mux_prefix)
        _, command = self._link.subscribe(self._mux_prefix + "*", "", self._on_reply)
        self._enqueue(command)

    def _disconnected(self) -> None:
        for listener in list(self._disconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("disconnect listener %r failed", listener)

    def _reconnected(self) -> None:
        self.reconnects += 1
        self._max_payload = self._link.max_payload
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("reconnect listener %r failed", listener)

    async def wait_closed_for_good(self) -> None:
        """Return once the connection has closed by itself and will not reconnect.

        nats-py gives up on a connection for protocol errors, or after
        ``max_reconnect_attempts``; :meth:`aclose` does not count.
        """
        await self._closed_for_good.wait()

    async def aclose(self) -> None:
        """Send what is queued, then close the connection."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            if self._link.connected:
                with trio.move_on_after(5.0) as scope:
                    try:
                        await self.flush()
                    except RequestTimeout:
                        scope.cancel()
                if scope.cancelled_caught:
                    log.warning("closing %s with publishes unsent", self.url)
            self._closed = True
            waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter.error = ConnectionClosed("the connection is closed")
                waiter.settle()
            await self._link.close()


def _inbox_of(subject: str, prefix: str) -> str | None:
    """The inbox ``subject`` subscribes to when it is one made by :meth:`Connection.new_inbox`
    (``<prefix>.<22-character nuid>``, perhaps with wildcard tokens after it), else None."""
    if not subject.startswith(prefix + "."):
        return None
    token = subject[len(prefix) + 1 :].split(".", 1)
    rest = token[1].split(".") if len(token) > 1 else []
    if len(token[0]) != 22 or any(part not in ("*", ">") for part in rest):
        return None
    return f"{prefix}.{token[0]}"


def _urls(url: str | Sequence[str] | None) -> list[str]:
    if url is None:
        url = os.environ.get("NATRIO_URL") or DEFAULT_URL
    urls = [url] if isinstance(url, str) else list(url)
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise ConfigurationError(f"invalid NATS URL {url!r}")
    return [u if "://" in u else f"nats://{u}" for u in urls]


@asynccontextmanager
async def connect(
    url: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    connect_timeout: float = 5.0,
    **options: Any,
) -> AsyncIterator[Connection]:
    """Connect to NATS and yield a :class:`Connection`; close it on exit.

    ``url`` is a URL or a list of them; without one, ``$NATRIO_URL``, else
    ``nats://127.0.0.1:4222``. ``connect_timeout`` bounds the first connection: when no
    server answers in time, :class:`ConnectError` names the URL and the last error.
    Other keyword arguments go to nats-py's ``connect`` (``user``, ``password``,
    ``token``, ``user_credentials``, ``nkeys_seed``, ``tls``, ``tls_hostname``,
    ``max_reconnect_attempts``, ``reconnect_time_wait``, ...). Once connected, the
    connection reconnects by itself, forever unless ``max_reconnect_attempts`` is set.
    """
    urls = _urls(url)
    shown = ", ".join(redact(u) for u in urls)
    if not connect_timeout > 0:
        raise ConfigurationError(f"connect_timeout must be > 0, got {connect_timeout!r}")
    options.setdefault("max_reconnect_attempts", -1)
    options.setdefault("reconnect_time_wait", 0.5)
    options.setdefault("connect_timeout", min(2.0, connect_timeout))
    if name is not None:
        options["name"] = name
    prefix = options.get("inbox_prefix")
    if prefix is not None:
        try:
            check_subject(str(prefix), kind="inbox_prefix", wildcards=False)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    holder: list[Connection] = []

    def on_reconnect() -> None:
        if holder:
            holder[0]._reconnected()

    def on_disconnect() -> None:
        if holder:
            holder[0]._disconnected()

    def on_closed() -> None:
        if holder and not holder[0]._closed:
            log.error("the connection to %s closed and will not reconnect", shown)
            holder[0]._closed_for_good.set()

    with single_error():
        async with open_link(
            urls,
            shown,
            connect_timeout,
            options,
            on_reconnect=on_reconnect,
            on_closed=on_closed,
            on_disconnect=on_disconnect,
        ) as link:
            conn = Connection(link, link.url or shown)
            holder.append(conn)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn._drain_outbox)
                    nursery.start_soon(conn._expire_requests)
                    await conn._start()
                    yield conn
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
