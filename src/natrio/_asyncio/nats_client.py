"""The one place natrio touches nats-py: its client on a trio-asyncio loop, with fast lanes,
direct socket writes, and the connect that tells refused credentials from a server not up yet.

This code reaches into nats-py internals (``_process_msg``, ``_pending``, the transport's
write buffer), so it is tied to the nats-py versions it is tested with; importing it with
another raises ImportError saying which versions work.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.aio.client
import nats.aio.subscription
import nats.errors
import nats.protocol.parser as parser
import trio
import trio_asyncio
from nats.protocol import command as prot_command

from .._errors import ConnectError, ConnectionClosed, RequestTimeout
from .._transport.protocol import parse_headers, redact

log = logging.getLogger("natrio.connection")

#: The nats-py releases this adapter is tested with (lowest included, highest excluded).
SUPPORTED_NATS_PY: tuple[tuple[int, int], tuple[int, int]] = ((2, 16), (2, 17))


def version_supported(version: str) -> bool:
    """Whether nats-py ``version`` (``"2.16.0"``) is one this adapter is tested with."""
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_NATS_PY
    return len(parts) == 2 and low <= parts < high


def _check_version() -> None:
    found = importlib.metadata.version("nats-py")
    low, high = SUPPORTED_NATS_PY
    if not version_supported(found):
        raise ImportError(
            f"natrio needs nats-py >={low[0]}.{low[1]},<{high[0]}.{high[1]} (it uses "
            f"nats-py internals tested with those releases), but nats-py {found} is installed"
        )


_check_version()


def _read_control_lines_as_the_server_writes_them() -> None:
    # nats-py splits MSG and HMSG lines at any ASCII whitespace (``\s``), nats-server only
    # at spaces and tabs. A subject with a vertical tab or form feed, which any client may
    # publish, then fails nats-py's parser, which drops the connection: every worker that
    # is delivered such a task would lose its connection again at every redelivery. These
    # patterns are nats-py's own with the server's separators.
    # Subject, subscription id, optional reply subject; fields end at a space or a tab.
    parser.MSG_RE = re.compile(rb"\A" + _MSG_LINE.pattern)
    parser.HMSG_RE = re.compile(rb"\A" + _HMSG_LINE.pattern)


# Subject, subscription id, optional reply subject; fields end at a space or a tab.
_FIELDS = rb"[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?"
# Matched at a position (no \A): the fast parser reads a buffer without cutting it up.
_MSG_LINE = re.compile(rb"MSG" + _FIELDS + rb"(\d+)\r\n")
_HMSG_LINE = re.compile(rb"HMSG" + _FIELDS + rb"(\d+)[ \t]+(\d+)\r\n")
_read_control_lines_as_the_server_writes_them()

_M, _H = ord("M"), ord("H")


class _Parser(parser.Parser):
    """nats-py's parser with a fast path for messages.

    nats-py matches each line against a pattern per protocol operation and cuts every
    message off the front of its buffer (a copy of the rest of the buffer each time).
    This reads MSG and HMSG lines and their payloads at offsets into one snapshot of the
    buffer, hands them to lanes without a coroutine per message, and leaves anything else
    (PING, INFO, -ERR, a line cut off by the end of a read) to nats-py's own parse.
    """

    nc: _Client

    async def parse(self, data: bytes = b"") -> None:
        if self.state == parser.AWAITING_MSG_PAYLOAD:
            # The rest of a message whose control line came with an earlier read: gathered
            # without copying until it is all there (a large payload comes in many reads).
            self.buf.extend(data)
            if len(self.buf) < self.needed + 2:
                return
            chunk = bytes(self.buf)
        elif self.buf:
            self.buf.extend(data)
            chunk = bytes(self.buf)
        else:
            # Most reads end at a message boundary, with nothing left over to join.
            chunk = bytes(data)
        end = len(chunk)
        pos = 0
        nc = self.nc
        if self.state == parser.AWAITING_MSG_PAYLOAD:
            needed = self.needed
            split = self.header_needed
            arg = self.msg_arg
            headers = chunk[:split] if split else None
            payload = chunk[split:needed]
            pos = needed + 2
            self.header_needed = 0
            self.state = parser.AWAITING_CONTROL_LINE
            if not nc.deliver(arg["sid"], arg["subject"], arg["reply"], payload, headers):
                self.buf = bytearray(chunk[pos:])
                await nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, headers)
                chunk, pos = bytes(self.buf), 0
                end = len(chunk)
        find = chunk.find
        while pos < end:
            eol = find(b"\r\n", pos, pos + parser.MAX_CONTROL_LINE_SIZE)
            if eol < 0:
                break  # cut off by the end of the read
            line = chunk[pos:eol]
            fields = line.split(b" ")
            count = len(fields)
            op = fields[0]
            if op == b"HMSG" and count == 6:
                _, subject, sid, reply, header_size, size = fields
            elif op == b"MSG" and count == 5:
                _, subject, sid, reply, size = fields
                header_size = b"0"
            elif op == b"HMSG" and count == 5:
                _, subject, sid, header_size, size = fields
                reply = b""
            elif op == b"MSG" and count == 4:
                _, subject, sid, size = fields
                reply, header_size = b"", b"0"
            else:
                break  # not a message: nats-py's parse takes it from here
            if (
                b"\t" in line
                or b"" in fields
                or not (sid.isdigit() and size.isdigit() and header_size.isdigit())
            ):
                break  # tabs or doubled blanks between fields: nats-py's parse reads those
            needed = int(size)
            split = int(header_size)
            start = eol + 2
            if end - start < needed + 2:
                # The payload is cut off by the end of the read: wait for the rest.
                self.msg_arg = {"subject": subject, "sid": int(sid), "reply": reply}
                self.needed = needed
                self.header_needed = split
                self.state = parser.AWAITING_MSG_PAYLOAD
                pos = start
                break
            headers = chunk[start : start + split] if split else None
            payload = chunk[start + split : start + needed]
            pos = start + needed + 2
            if not nc.deliver(int(sid), subject, reply, payload, headers):
                # Not a lane's: nats-py's own subscription machinery, which may wait.
                self.buf = bytearray(chunk[pos:])
                await nc._process_msg(int(sid), subject, reply, payload, headers)
                chunk, pos = bytes(self.buf), 0
                end = len(chunk)
                find = chunk.find
        self.buf = bytearray(chunk[pos:])
        if self.buf and self.state == parser.AWAITING_CONTROL_LINE:
            await super().parse()


# A lane: where a subscription's messages go, called synchronously by nats-py's read loop
# with the subject, reply subject (both bytes), payload and parsed headers.
Lane = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]

# Above this many bytes waiting in the socket's buffer, publishes go through nats-py's own
# pending buffer and flusher, which waits for the socket to drain.
_DIRECT_WRITE_LIMIT = 1 << 20


class _Client(nats.aio.client.Client):
    """nats-py's client with fast lanes for natrio's subscriptions.

    nats-py hands each message of a callback subscription to an asyncio queue and a task
    per subscription; under trio-asyncio that hop costs more than everything else natrio
    does with the message. A lane is a plain function the read loop calls at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[int, Lane] = {}
        self._ps = _Parser(self)

    def deliver(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        """Hand a message to its subscription's lane; False when it has none."""
        lane = self.lanes.get(sid)
        if lane is None:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            lane(subject, reply, data, parse_headers(headers) if headers else None)
        except Exception:
            # Whatever a lane does wrong must not end nats-py's read loop.
            log.exception("handling a message on %r failed", subject)
        return True

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        # nats-py passes None for ``headers`` when a message has none.
        if not self.deliver(sid, subject, reply, data, headers):
            # nats-py's own annotation says bytes; it is given None too.
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]


class NatsLink:
    """One connected nats-py client as the Trio side uses it: state, subscriptions by lane,
    batched writes, flush and close. Only :func:`open_link` makes one."""

    def __init__(self, client: _Client, loop: Any) -> None:
        self._client = client
        self._loop = loop
        self._subs: dict[int, Any] = {}

    def _aio(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)  # type: ignore[no-any-return]

    # -- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether nats-py has closed the connection (it then never reconnects)."""
        return bool(self._client.is_closed)

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return bool(self._client.is_connected)

    @property
    def max_payload(self) -> int:
        """The server's max_payload."""
        return int(self._client.max_payload)

    @property
    def server_version(self) -> str:
        """The version the connected server reports."""
        # nats-py's ServerVersion prints as "<nats server v2.15.1>": the plain version.
        return str(self._client.connected_server_version._server_version)

    @property
    def url(self) -> str | None:
        """The URL connected to, credentials redacted."""
        url = self._client.connected_url
        return redact(str(url.geturl())) if url else None

    @property
    def inbox_prefix(self) -> str:
        """The prefix of the connection's inboxes (``_INBOX`` unless set on connect)."""
        return bytes(self._client._inbox_prefix).decode()

    def new_inbox(self) -> str:
        """A unique subject under the connection's inbox prefix."""
        return str(self._client.new_inbox())

    def stats(self) -> dict[str, int]:
        """nats-py's counters."""
        return dict(self._client.stats)

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(self, subject: str, queue: str, lane: Lane) -> tuple[int, bytes]:
        """Register a subscription with ``lane`` receiving every message, at once.

        Returns its id and the SUB command for the caller to write (in order with its
        publishes): nats-py's own subscribe() is a coroutine, whose hop through asyncio
        cost a waiting client more than the rest of subscribing. nats-py knows the
        subscription as its own, so it subscribes again after a reconnect.
        """
        nc = self._client
        if nc.is_closed:
            raise ConnectionClosed("the connection is closed")
        try:
            nats.aio.client._validate_subject(subject, strict=True)
            nats.aio.client._validate_queue(queue)
        except nats.errors.Error as exc:
            raise ValueError(f"cannot subscribe to {subject[:100]!r}: {exc!r}") from None
        nc._sid += 1
        sid: int = nc._sid
        sub = nats.aio.subscription.Subscription(nc, sid, subject, queue=queue)
        nc.lanes[sid] = lane
        nc._subs[sid] = sub
        self._subs[sid] = sub
        return sid, prot_command.sub_cmd(subject, queue, sid)

    async def drain(self, sid: int) -> None:
        """Remove interest and wait until what the server sent has arrived (errors logged)."""
        sub = self._subs.get(sid)
        if sub is None or self.closed:
            return
        try:
            await self._aio(sub.drain)()
        except nats.errors.Error as exc:
            log.debug("draining %s: %r", sub.subject, exc)
            return
        # Drained, so nats-py has removed it: nothing left to unsubscribe.
        self._subs.pop(sid, None)
        self._client.lanes.pop(sid, None)

    def unsubscribe(self, sid: int) -> bytes | None:
        """Forget the subscription and its lane at once; returns the UNSUB command for the
        caller to write, or None when there is nothing to tell the server."""
        sub = self._subs.pop(sid, None)
        self._client.lanes.pop(sid, None)
        self._client._remove_sub(sid)
        if sub is None or self.closed:
            return None
        return prot_command.unsub_cmd(sid, 0)

    # -- writing ----------------------------------------------------------------------

    def write(self, commands: list[bytes], size: int) -> str | None:
        """Hand encoded commands to the socket in order; returns why not, or None.

        Straight to the socket when nats-py has nothing of its own waiting, else behind
        its pending buffer (which also holds them while reconnecting).
        """
        nc = self._client
        if nc.is_closed:
            return "the connection is closed"
        if nc.is_connected and not nc._pending and _buffered(nc) < _DIRECT_WRITE_LIMIT:
            try:
                nc._transport.writelines(commands)  # type: ignore[union-attr]
            except (OSError, RuntimeError, AttributeError) as exc:
                return repr(exc)
        elif nc.is_connected or (
            nc._max_pending_size > 0 and nc._pending_data_size + size <= nc._max_pending_size
        ):
            nc._pending.extend(commands)
            nc._pending_data_size += size
            if nc.is_connected and nc._flush_queue is not None and nc._flush_queue.empty():
                nc._flush_queue.put_nowait(self._loop.create_future())
        else:
            return "reconnecting, and the reconnect buffer is full"
        nc.stats["out_msgs"] += len(commands)
        nc.stats["out_bytes"] += size
        return None

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 - nats-py's own timeout
        """Wait until the server has seen everything written; RequestTimeout if it did not."""
        try:
            await self._aio(self._client.flush)(timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise RequestTimeout(f"flush did not complete: {exc!r}") from None

    async def close(self) -> None:
        """Close the nats-py client."""
        await self._aio(self._client.close)()


def _buffered(nc: Any) -> int:
    """Bytes waiting in the socket's write buffer."""
    try:
        return int(nc._transport._io_writer.transport.get_write_buffer_size())
    except AttributeError:  # another kind of transport (websocket)
        return 0


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


@asynccontextmanager
async def open_link(
    urls: list[str],
    shown: str,
    connect_timeout: float,
    options: Mapping[str, Any],
    *,
    on_reconnect: Callable[[], None],
    on_closed: Callable[[], None],
    on_disconnect: Callable[[], None] = lambda: None,
) -> AsyncIterator[NatsLink]:
    """A trio-asyncio loop and a connected nats-py client on it, for the ``async with`` body.

    ``shown`` is how the URLs appear in messages (redacted). Raises ConnectError when no
    connection was made within ``connect_timeout``, at once for refused credentials or a
    failed TLS handshake. ``on_reconnect``, ``on_disconnect`` and ``on_closed`` are called in
    Trio's thread.
    """
    async with trio_asyncio.open_loop() as loop:
        state: dict[str, Any] = {"connected": False, "last_error": None}

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
                on_disconnect()

        async def reconnected_cb() -> None:
            log.info("reconnected to %s", shown)
            on_reconnect()

        async def closed_cb() -> None:
            if state["connected"]:
                on_closed()

        client = _Client()
        connected = False
        with trio.move_on_after(connect_timeout):
            try:
                await trio_asyncio.aio_as_trio(client.connect, loop=loop)(
                    servers=urls,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    closed_cb=closed_cb,
                    **options,
                )
                connected = True
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
        if not connected:
            last = state["last_error"]
            reason = f": {redact(str(last)) or type(last).__name__}" if last else ""
            raise ConnectError(f"could not connect to {shown} within {connect_timeout} s{reason}")
        state["connected"] = True
        yield NatsLink(client, loop)
