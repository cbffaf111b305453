"""The connection bridge: a nats-py connection on a trio-asyncio loop, offered as Trio methods.

This is the only module that imports asyncio, trio_asyncio or nats. Two rules keep it
fast (see DESIGN.md): messages cross from asyncio into Trio without awaiting (nats-py
callbacks push into Trio memory channels or set Trio events), and publishes queue on
the Trio side and cross into asyncio once per batch, never once per message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import nats
import nats.errors
import trio
import trio_asyncio

from ._errors import (
    ConfigurationError,
    ConnectError,
    ConnectionClosed,
    NoResponders,
    PayloadTooLarge,
    RequestTimeout,
)
from ._util import single_error

__all__ = ["DEFAULT_URL", "Connection", "Message", "Reply", "Subscription", "connect"]

DEFAULT_URL = "nats://127.0.0.1:4222"

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


class Reply:
    """Where a reply (or the error that stopped the request) lands for one Trio caller."""

    __slots__ = ("__weakref__", "error", "event", "message")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None
        self.error: BaseException | None = None


# An outbox item: subject, payload, reply, headers, and the waiter to fail if it cannot
# be sent (or, with subject None, a marker whose waiter is set once everything before it
# has been handed to nats-py).
_Item = tuple[str | None, bytes, str, Mapping[str, str] | None, Reply | None]


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
        self._wake: asyncio.Event = asyncio.Event()
        self._waiters: dict[str, Reply] = {}
        self._expected: weakref.WeakValueDictionary[str, Reply] = weakref.WeakValueDictionary()
        self._tokens = itertools.count()
        self._mux_prefix = ""
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

    def _check(self, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> None:
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        # The server's limit covers the header block too: "NATS/1.0\r\n", "k: v\r\n"..., "\r\n".
        size = len(payload)
        if headers:
            size += 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if size > self._nc.max_payload:
            raise PayloadTooLarge(
                f"message of {size} bytes (payload and headers) exceeds the server's "
                f"max_payload of {self._nc.max_payload} bytes (subject {subject})"
            )

    def _enqueue(self, item: _Item) -> None:
        self._outbox.append(item)
        if self._drainer_idle:
            self._drainer_idle = False
            self._loop.call_soon(self._wake.set)

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
        self._check(subject, payload, headers)
        self._enqueue((subject, payload, reply, headers, None))

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Message:
        """Publish with a reply subject and return the first reply.

        Waits as long as the caller's cancel scope allows (wrap it in
        ``trio.move_on_after``). Raises NoResponders (nobody subscribed; for a JetStream
        publish, no stream holds the subject), PayloadTooLarge or ConnectionClosed.
        """
        self._check(subject, payload, headers)
        token = str(next(self._tokens))
        waiter = Reply()
        self._waiters[token] = waiter
        try:
            self._enqueue((subject, payload, self._mux_prefix + token, headers, waiter))
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

    async def flush(self) -> None:
        """Wait until every queued publish has been sent and the server has seen it.

        Bound it with a cancel scope; nats-py's own flush gives up after 10 s with
        RequestTimeout.
        """
        if self._closed:
            return
        marker = Reply()
        self._enqueue((None, b"", "", None, marker))
        await marker.event.wait()
        try:
            await self._aio(self._nc.flush)(10)
        except (TimeoutError, nats.errors.Error) as exc:
            raise RequestTimeout(f"flush did not complete: {exc!r}") from None

    async def _drain_outbox(self) -> None:
        # The one asyncio task that hands queued publishes to nats-py, a batch per wake-up,
        # so that a batch costs one crossing and publishes keep their order.
        nc = self._nc
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for subject, payload, reply, headers, waiter in batch:
                    if subject is None:
                        assert waiter is not None
                        waiter.event.set()
                        continue
                    try:
                        await nc.publish(subject, payload, reply=reply, headers=headers)
                    except (nats.errors.Error, OSError) as exc:
                        if waiter is not None:
                            waiter.error = ConnectionClosed(
                                f"could not publish on {subject}: {exc!r}"
                            )
                            waiter.event.set()
                        else:
                            log.warning("could not publish on %s: %r", subject, exc)
            self._drainer_idle = True

    # -- subscribing ------------------------------------------------------------------

    async def subscribe(self, subject: str, *, queue: str = "") -> Subscription:
        """Subscribe to ``subject`` (optionally in a queue group); messages arrive in Trio."""
        if self._closed:
            raise ConnectionClosed("the connection is closed")
        send, receive = trio.open_memory_channel[Message](math.inf)
        push = send.send_nowait

        async def deliver(msg: Any) -> None:
            with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                push(Message(msg.subject, msg.data, msg.reply, msg.headers))

        sub = await self._aio(self._nc.subscribe)(subject, queue=queue, cb=deliver)
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

    def _on_reply(self, msg: Any) -> None:
        token = msg.subject[len(self._mux_prefix) :]
        waiter = self._waiters.pop(token, None) or self._expected.pop(token, None)
        if waiter is not None:
            waiter.message = Message(msg.subject, msg.data, msg.reply, msg.headers)
            waiter.event.set()

    async def _start(self) -> None:
        self._mux_prefix = self.new_inbox() + "."

        async def on_reply(msg: Any) -> None:
            self._on_reply(msg)

        await self._aio(self._nc.subscribe)(self._mux_prefix + "*", cb=on_reply)

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
            for waiter in self._waiters.values():
                waiter.error = ConnectionClosed("the connection is closed")
                waiter.event.set()
            await self._aio(self._nc.close)()


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
                nc = await trio_asyncio.aio_as_trio(nats.connect, loop=loop)(
                    servers=urls,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    **options,
                )
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
        drainer = loop.create_task(conn._drain_outbox())
        try:
            await conn._start()
            yield conn
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()
                drainer.cancel()
