"""The connection bridge: a nats-py connection on a trio-asyncio loop, offered as Trio methods.

With ``baselines`` beside it, the only place that imports asyncio, trio_asyncio or nats.
What keeps it fast (see DESIGN.md and docs/performance.md): messages go from nats-py's
read loop to natrio's subscriptions through "lanes", plain functions called at once (no
asyncio queue or task per subscription), and on into Trio without awaiting; publishes
queue on the Trio side and are encoded and written to the socket once per scheduler
pass, never once per message; request timeouts are swept, not a cancel scope each.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import re
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import nats
import nats.aio.client
import nats.errors
import trio
import trio_asyncio

from .._errors import (
    ConfigurationError,
    ConnectError,
    ConnectionClosed,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
)
from .._util import single_error

__all__ = [
    "DEFAULT_URL",
    "Connection",
    "Headers",
    "Message",
    "Reply",
    "Subscription",
    "connect",
]

DEFAULT_URL = "nats://127.0.0.1:4222"

# How often timed-out requests are looked for: the precision of request timeouts.
_SWEEP_INTERVAL = 0.05

log = logging.getLogger("natrio.connection")


def redact(url: str) -> str:
    """``url`` with any user, password or token replaced by ``***``.

    Everything up to the last ``@`` of the authority is credentials (a password may hold
    ``@`` or ``/``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return url
    return f"{scheme}{sep}***@{rest[at + 1 :]}"


class Message:
    """A message as natrio sees it: subject, payload, reply subject and headers."""

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(
        self, subject: str, data: bytes, reply: str, headers: Mapping[str, str] | None
    ) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers

    @property
    def status(self) -> str | None:
        """The status code of a server status message (``"100"``, ``"408"``, ...), else None."""
        return self.headers.get("Status") if self.headers else None

    def header(self, name: str, default: str | None = None) -> str | None:
        """One header's value, or ``default``."""
        return self.headers.get(name, default) if self.headers else default

    def __repr__(self) -> str:
        return f"Message(subject={self.subject!r}, reply={self.reply!r}, {len(self.data)} bytes)"


class Headers(Mapping[str, str]):
    """Message headers encoded once, for a publish that repeats them (an event and its reply)
    or a header set that never changes. Raises ValueError for invalid names or values."""

    __slots__ = ("_items", "block")

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = dict(items)
        self.block = _header_block(self._items) if self._items else b""

    @classmethod
    def of_own(cls, items: dict[str, str]) -> Headers:
        """Headers natrio builds itself from validated names, ids and numbers: encoded
        without the checks (the per-task events are the hot path)."""
        headers = cls.__new__(cls)
        headers._items = items
        headers.block = _header_text(items).encode()
        return headers

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Reply:
    """Where a reply (or the error that stopped the request) lands for one Trio caller."""

    __slots__ = ("__weakref__", "error", "event", "message")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        """The reply (or error) is in: wake the caller."""
        self.event.set()


class _CallbackReply:
    """Where a reply lands for :meth:`Connection.request_nowait`: a function called with it."""

    __slots__ = ("__weakref__", "callback", "error", "message", "settled")

    def __init__(self, callback: Callable[[Message | None, BaseException | None], None]) -> None:
        self.callback = callback
        self.message: Message | None = None
        self.error: BaseException | None = None
        self.settled = False

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
_Item = tuple[str, bytes, str, bytes, _Waiter | None]

# Above this many bytes waiting in the socket's buffer, publishes go through nats-py's own
# pending buffer and flusher, which waits for the socket to drain.
_DIRECT_WRITE_LIMIT = 1 << 20


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
        sub: Any,
    ) -> None:
        self.subject = subject
        self._conn = conn
        self._receive = receive_channel
        self._send = send_channel
        self._sub = sub
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
        """Remove interest, wait until every message the server sent has arrived, then end."""
        if self._closed:
            return
        self._closed = True
        if not self._conn.closed:
            try:
                await self._conn._aio(self._sub.drain)()
            except nats.errors.Error as exc:
                log.debug("draining %s: %r", self.subject, exc)
        self._conn._nc.lanes.pop(self._sub._id, None)
        self._send.close()

    async def unsubscribe(self) -> None:
        """Remove interest at once; messages still on their way are dropped."""
        if self._closed:
            return
        self._closed = True
        if not self._conn.closed:
            try:
                await self._conn._aio(self._sub.unsubscribe)()
            except nats.errors.Error as exc:
                log.debug("unsubscribing %s: %r", self.subject, exc)
        self._conn._nc.lanes.pop(self._sub._id, None)
        self._send.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            await self.unsubscribe()


class Connection:
    """A NATS connection with Trio-native methods. Make one with :func:`natrio.connect`."""

    def __init__(self, nc: Any, loop: Any, url: str) -> None:
        self._nc = nc
        self._loop = loop
        self.url = url
        self._outbox: list[_Item] = []
        self._drainer_idle = True
        self._wake = trio.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._expected: weakref.WeakValueDictionary[str, Reply] = weakref.WeakValueDictionary()
        self._tokens = itertools.count()
        self._mux_prefix = ""
        self._mux_length = 0
        self._deadlines: list[tuple[float, str, str, float]] = []
        self._sweep_wake = trio.Event()
        self._sweeper_idle = True
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._closed = False
        self.reconnects = 0

    # -- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection has been closed (by :meth:`aclose` or for good by nats-py)."""
        return self._closed or bool(self._nc.is_closed)

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (it may be reconnecting)."""
        return bool(self._nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The largest payload the server accepts, in bytes."""
        return int(self._nc.max_payload)

    @property
    def server_version(self) -> str:
        """The version the connected server reports."""
        return str(self._nc.connected_server_version)

    def new_inbox(self) -> str:
        """A unique subject to receive replies on."""
        return str(self._nc.new_inbox())

    def add_reconnect_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (synchronously, in Trio) after every reconnect; returns a remover."""
        self._reconnect_listeners.append(listener)

        def remove() -> None:
            if listener in self._reconnect_listeners:
                self._reconnect_listeners.remove(listener)

        return remove

    def statistics(self) -> dict[str, int]:
        """Counters: messages and bytes in and out, reconnects, queued publishes."""
        stats = dict(self._nc.stats)
        stats["outbox"] = len(self._outbox)
        stats["pending_requests"] = len(self._waiters)
        return stats

    # -- publishing -------------------------------------------------------------------

    def _aio(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)  # type: ignore[no-any-return]

    def _check(self, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> bytes:
        # Validates a publish and returns its encoded header block (b"" for none), so that
        # header names and values are walked once.
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        if not subject or _BAD_SUBJECT.search(subject):
            raise ValueError(f"invalid subject {subject!r}")
        if isinstance(headers, Headers):
            block = headers.block
        else:
            block = _header_block(headers) if headers else b""
        size = len(payload) + len(block)
        if size > self._nc.max_payload:
            raise PayloadTooLarge(
                f"message of {size} bytes (payload and headers) exceeds the server's "
                f"max_payload of {self._nc.max_payload} bytes (subject {subject})"
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
        if reply and _BAD_SUBJECT.search(reply):
            raise ValueError(f"invalid reply subject {reply!r}")
        self._enqueue((subject, payload, reply, block, None))

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
    ) -> None:
        """Publish with a reply subject; ``on_reply(message, error)`` gets the first reply.

        It is called synchronously, exactly once: with the reply, or with RequestTimeout
        after about ``timeout`` seconds, or with ConnectionClosed. It must not block.
        Raises PayloadTooLarge or ConnectionClosed at once when the publish is refused.
        """
        self._send_request(subject, payload, headers, timeout, _CallbackReply(on_reply))

    def _send_request(
        self,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        timeout: float | None,
        waiter: _Waiter,
    ) -> str:
        block = self._check(subject, payload, headers)
        token = str(next(self._tokens))
        self._waiters[token] = waiter
        if timeout is not None:
            heapq.heappush(
                self._deadlines, (trio.current_time() + timeout, token, subject, timeout)
            )
            if self._sweeper_idle:
                self._sweeper_idle = False
                self._sweep_wake.set()
        self._enqueue((subject, payload, self._mux_prefix + token, block, waiter))
        return token

    async def _expire_requests(self) -> None:
        # Fails requests whose timeout passed. Deadlines of answered requests stay in the
        # heap until they pass: removing them would cost every request a heap search.
        deadlines = self._deadlines
        while True:
            await self._sweep_wake.wait()
            self._sweep_wake = trio.Event()
            while deadlines:
                await trio.sleep(_SWEEP_INTERVAL)
                now = trio.current_time()
                while deadlines and deadlines[0][0] <= now:
                    _, token, subject, timeout = heapq.heappop(deadlines)
                    waiter = self._waiters.pop(token, None)
                    if waiter is not None:
                        waiter.error = RequestTimeout(
                            f"no reply to a request on {subject} within {timeout} s"
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
        try:
            await self._aio(self._nc.flush)(10)
        except (TimeoutError, nats.errors.Error) as exc:
            raise RequestTimeout(f"flush did not complete: {exc!r}") from None

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
        commands = [
            _encode(subject, reply, payload, block) for subject, payload, reply, block, _ in batch
        ]
        nc = self._nc
        size = sum(map(len, commands))
        error: str | None = None
        if nc.is_closed:
            error = "the connection is closed"
        elif nc.is_connected and not nc._pending and _buffered(nc) < _DIRECT_WRITE_LIMIT:
            # nats-py has nothing of its own waiting, so writing now keeps every order.
            try:
                nc._transport.writelines(commands)
            except (OSError, RuntimeError, AttributeError) as exc:
                error = repr(exc)
        elif nc.is_connected or (
            nc._max_pending_size > 0 and nc._pending_data_size + size <= nc._max_pending_size
        ):
            # Behind nats-py's own commands, or reconnecting: its pending buffer keeps the
            # order and is written once the socket drains (or the connection is back).
            nc._pending.extend(commands)
            nc._pending_data_size += size
            if nc.is_connected and nc._flush_queue is not None and nc._flush_queue.empty():
                nc._flush_queue.put_nowait(self._loop.create_future())
        else:
            error = "reconnecting, and the reconnect buffer is full"
        if error is None:
            nc.stats["out_msgs"] += len(commands)
            nc.stats["out_bytes"] += size
            return
        log.warning("could not send %d message(s): %s", len(commands), error)
        for _, _, reply, _, waiter in batch:
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
            with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                handle(Message(subject.decode(), data, reply.decode(), headers))

        sub = await self._aio(self._nc.subscribe_lane)(subject, queue, deliver)
        return Subscription(self, subject, receive, send, sub)

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
        token = subject[self._mux_length :].decode()
        waiter = self._waiters.pop(token, None) or self._expected.pop(token, None)
        if waiter is not None:
            waiter.message = Message(subject.decode(), data, reply.decode(), headers)
            waiter.settle()

    async def _start(self) -> None:
        self._mux_prefix = self.new_inbox() + "."
        self._mux_length = len(self._mux_prefix)
        await self._aio(self._nc.subscribe_lane)(self._mux_prefix + "*", "", self._on_reply)

    def _reconnected(self) -> None:
        self.reconnects += 1
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:
                log.exception("reconnect listener %r failed", listener)

    async def aclose(self) -> None:
        """Send what is queued, then close the connection."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            if self._nc.is_connected:
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
            await self._aio(self._nc.close)()


# A lane: where a subscription's messages go, called synchronously by nats-py's read loop
# with the subject, reply subject (both bytes), payload and parsed headers.
_Lane = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]

_BAD_SUBJECT = re.compile(r"[\s]")


class _Client(nats.aio.client.Client):
    """nats-py's client with fast lanes for natrio's subscriptions.

    nats-py hands each message of a callback subscription to an asyncio queue and a task
    per subscription; under trio-asyncio that hop costs more than everything else natrio
    does with the message. A lane is a plain function the read loop calls at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[int, _Lane] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        # nats-py passes None for ``headers`` when a message has none.
        lane = self.lanes.get(sid)
        if lane is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            lane(subject, reply, data, _parse_headers(headers) if headers else None)
        except Exception:
            # Whatever a lane does wrong must not end nats-py's read loop.
            log.exception("handling a message on %r failed", subject)

    async def subscribe_lane(self, subject: str, queue: str, lane: _Lane) -> Any:
        # The lane is in place before the SUB can reach the server: subscribe() queues it
        # without yielding to the read loop.
        sub = await self.subscribe(subject, queue=queue)
        self.lanes[sub._id] = lane
        return sub


def _parse_headers(raw: bytes) -> dict[str, str]:
    """A received header block as a dict, the status line as ``Status`` and ``Description``.

    ``NATS/1.0[ <status>[ <description>]]\\r\\n`` then ``Name: value`` lines; a name given
    twice keeps its last value, as in nats-py (whose parser cost more than the rest of
    receiving a task).
    """
    lines = raw.decode(errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    first = lines[0]
    if len(first) > 9:
        status, _, description = first[9:].strip().partition(" ")
        if status.isdigit():
            headers["Status"] = status
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def _header_text(headers: Mapping[str, str]) -> str:
    return "NATS/1.0\r\n" + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) + "\r\n"


def _header_block(headers: Mapping[str, str]) -> bytes:
    """The encoded header block of a message; ValueError for names or values that would
    break it."""
    for name in headers:
        if name not in _valid_names:
            if not name or _BAD_SUBJECT.search(name) or ":" in name:
                raise ValueError(f"invalid header name {name!r}")
            if len(_valid_names) < 1024:
                _valid_names.add(name)
    text = _header_text(headers)
    # A line break inside a value would add a line: count them rather than scan each value.
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("header values may not contain line breaks")
    return text.encode()


_valid_names: set[str] = set()


def _buffered(nc: Any) -> int:
    """Bytes waiting in the socket's write buffer."""
    try:
        return int(nc._transport._io_writer.transport.get_write_buffer_size())
    except AttributeError:  # another kind of transport (websocket)
        return 0


def _encode(subject: str, reply: str, payload: bytes, block: bytes) -> bytes:
    """One PUB or HPUB command, as the NATS protocol has it."""
    if not block:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(block),
        len(block) + len(payload),
        block,
        payload,
    )


class _Refused(Exception):
    """The server refused us for good (credentials, TLS): raised out of nats-py's connect."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(type(reason).__name__)
        self.reason = reason


def _refused(exc: Exception) -> bool:
    # nats-py reports a refused CONNECT as a plain nats.errors.Error whose text names the
    # violation, and TLS failures as ssl errors.
    if isinstance(exc, nats.errors.AuthorizationError | ssl.SSLError):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


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
    with single_error():
        async with _open_connection(urls, shown, connect_timeout, name, options) as conn:
            yield conn


@asynccontextmanager
async def _open_connection(
    urls: list[str], shown: str, connect_timeout: float, name: str | None, options: dict[str, Any]
) -> AsyncIterator[Connection]:
    async with trio_asyncio.open_loop() as loop:
        state: dict[str, Any] = {"connected": False, "last_error": None, "conn": None}

        async def error_cb(exc: Exception) -> None:
            state["last_error"] = exc
            if not state["connected"] and _refused(exc):
                # Wrong credentials or certificates will not get better by retrying: fail
                # the first connect now instead of trying until connect_timeout.
                raise _Refused(exc)
            if state["connected"]:
                log.warning(
                    "NATS connection to %s: %s", shown, redact(str(exc)) or type(exc).__name__
                )
            # Before the first connection the error ends up in ConnectError instead.

        async def disconnected_cb() -> None:
            if state["connected"]:
                log.info("disconnected from %s", shown)

        async def reconnected_cb() -> None:
            log.info("reconnected to %s", shown)
            conn = state["conn"]
            if conn is not None:
                conn._reconnected()

        options.setdefault("max_reconnect_attempts", -1)
        options.setdefault("reconnect_time_wait", 0.5)
        options.setdefault("connect_timeout", min(2.0, connect_timeout))
        if name is not None:
            options["name"] = name

        nc = None
        with trio.move_on_after(connect_timeout):
            try:
                client = _Client()
                await trio_asyncio.aio_as_trio(client.connect, loop=loop)(
                    servers=urls,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    **options,
                )
                nc = client
            except _Refused as refused:
                cause = refused.reason
                detail = (
                    "TLS handshake failed"
                    if isinstance(cause, ssl.SSLError)
                    else "authorization failed"
                )
                raise ConnectError(
                    f"could not connect to {shown}: {detail} ({redact(str(cause)) or type(cause).__name__})"
                ) from None
            except nats.errors.AuthorizationError:
                raise ConnectError(f"could not connect to {shown}: authorization failed") from None
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise ConnectError(
                    f"could not connect to {shown}: {redact(str(exc)) or type(exc).__name__}"
                ) from None
        if nc is None:
            last = state["last_error"]
            reason = f": {redact(str(last)) or type(last).__name__}" if last else ""
            raise ConnectError(f"could not connect to {shown} within {connect_timeout} s{reason}")
        state["connected"] = True
        conn = Connection(
            nc, loop, redact(str(nc.connected_url.geturl())) if nc.connected_url else shown
        )
        state["conn"] = conn
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
