"""The consumer: one JetStream pull consumer, pulled continuously, its messages handed to a sink.

natrio speaks the pull protocol itself rather than calling nats-py's ``fetch()`` (see
DESIGN.md): pull requests are published to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>``
with an inbox as reply subject, messages arrive on that inbox, and the consumer keeps
``held + requested <= window``, where ``held`` are messages handed to the sink and not
yet released and ``requested`` are messages asked for and not yet received.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import trio

from ._asyncio.bridge import Connection, Message, Subscription
from ._errors import NatrioError

log = logging.getLogger("natrio.consumer")

_NS = 1_000_000_000


class ConsumerGone(NatrioError):
    """The server reported the consumer deleted (409) or rejected its pulls (400)."""


class PullConsumer:
    """Pulls one durable consumer continuously and hands each task message to ``sink``.

    ``sink(message)`` (set before :meth:`run`) is called synchronously for every delivered message; the owner
    calls :meth:`release` once the message is acked, NAK'd or terminated, which frees
    room in the window. ``group`` makes the pulls priority-group pulls (with the pin id
    the server hands out, when it is a pinned-client group). When the server says the
    consumer is gone, ``recreate()`` is awaited and pulling starts again.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        stream: str,
        name: str,
        window: int,
        sink: Callable[[Message], None] | None = None,
        expires: float = 30.0,
        heartbeat: float = 5.0,
        group: str | None = None,
        recreate: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.conn = conn
        self.stream = stream
        self.name = name
        self.window = window
        self.group = group
        self.pin_id: str | None = None
        self.requested = 0
        self.held = 0
        self.received = 0
        self.pulls = 0
        self.sink = sink
        self._recreate = recreate
        self._threshold = max(1, window // 2)
        self._heartbeat = heartbeat
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
        self._pull_options: dict[str, object] = {
            "expires": int(expires * _NS),
            "idle_heartbeat": int(min(heartbeat, expires / 2) * _NS),
        }
        if group is not None:
            self._pull_options["group"] = group
        self._inbox: Subscription | None = None
        self._pulling = False
        self._gone: str | None = None
        self._last_activity = 0.0
        self._paused_until = 0.0
        self._backoff = 0.0
        self._unanswered = 0
        self._rewatch = trio.Event()
        self._stopped = False

    # -- pulling ----------------------------------------------------------------------

    def _pull(self) -> None:
        if not self._pulling or self._inbox is None or self._gone is not None:
            return
        if self._paused_until and trio.current_time() < self._paused_until:
            return
        if not self.conn.connected:
            # Queued in nats-py's reconnect buffer, every such pull would go out on
            # reconnect and over-fill the window; the reconnect listener pulls once instead.
            return
        free = self.window - self.held - self.requested
        # Pull in halves of the window, but never sit idle with room and nothing asked for.
        if free < self._threshold and not (free > 0 and self.requested == 0):
            return
        body = dict(self._pull_options, batch=free)
        if self.pin_id is not None:
            body["id"] = self.pin_id
        self.requested += free
        self.pulls += 1
        self._last_activity = trio.current_time()
        self.conn.publish_nowait(
            self._pull_subject, json.dumps(body).encode(), reply=self._inbox.subject
        )

    def _reset(self) -> None:
        # Outstanding pulls are lost (reconnect, leadership change, silence): ask afresh.
        self.requested = 0
        self._pull()

    def release(self, count: int = 1) -> None:
        """``count`` held messages reached their end (acked, NAK'd or terminated)."""
        self.held -= count
        self._pull()

    # -- receiving --------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        status = msg.status
        if status is None:
            self._backoff = 0.0
            self._unanswered = 0
            if self.requested > 0:
                self.requested -= 1
            self.held += 1
            self.received += 1
            if self.group is not None:
                pin = msg.header("Nats-Pin-Id")
                if pin:
                    self.pin_id = pin
            assert self.sink is not None, "set PullConsumer.sink before run()"
            self.sink(msg)
            return
        if status == "100":
            return
        description = msg.header("Description", "") or ""
        if status == "409" and "Leadership Change" in description:
            self.requested = 0
            return
        if status == "409" and ("Consumer Deleted" in description or "push based" in description):
            self._gone = description
            return
        if status == "400":
            self._gone = f"400 {description}"
            return
        if status == "503":
            # No one answered for the consumer (an election, or the consumer is gone): the
            # pull never registered. Pull again after a backoff; after a few in a row, make
            # sure the consumer exists (recreating it is idempotent).
            self.requested = 0
            self._unanswered += 1
            if self._unanswered >= 3:
                self._unanswered = 0
                self._gone = "pulls unanswered (503)"
            self._back_off()
            return
        if status == "423":
            # Another client holds the pin: forget ours and keep pulling as a standby.
            self.pin_id = None
        pending = msg.header("Nats-Pending-Messages")
        if pending is not None:
            self.requested = max(0, self.requested - int(pending))
        elif status == "409":
            # A rejected pull ("Exceeded MaxRequestBatch", "Exceeded MaxWaiting", ...):
            # nothing will come for it. Ask afresh after a backoff.
            log.warning("consumer %s: pull rejected: %s", self.name, description)
            self.requested = 0
            self._back_off()
        elif status not in ("404", "408"):
            log.warning("consumer %s: unexpected status %s %s", self.name, status, description)

    def _back_off(self) -> None:
        self._backoff = min(self._backoff * 2, 2.0) if self._backoff else 0.1
        self._paused_until = trio.current_time() + self._backoff
        self._rewatch.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pull until :meth:`stop`; started once the inbox exists and the first pull is sent."""
        # Messages reach _on_message straight from the connection's read loop; this task
        # only watches for silence, backoffs and a lost consumer.
        inbox = await self.conn.subscribe(self.conn.new_inbox(), on_message=self._on_message)
        self._inbox = inbox
        remove_listener = self.conn.add_reconnect_listener(self._reset)
        try:
            self._pulling = True
            self._pull()
            task_status.started()
            await self._supervise()
        finally:
            remove_listener()
            self._pulling = False
            with trio.CancelScope(shield=True):
                # Drain rather than unsubscribe, also when cancelled: messages the server
                # already sent must reach the sink (which NAKs them during shutdown), not
                # vanish inside nats-py and wait out AckWait.
                with trio.move_on_after(0.5):
                    await inbox.drain()
                await inbox.unsubscribe()

    def _on_message(self, msg: Message) -> None:
        self._handle(msg)
        self._last_activity = trio.current_time()
        if self._gone is not None:
            self._rewatch.set()  # the supervisor recreates the consumer
        else:
            self._pull()

    async def _supervise(self) -> None:
        # Pulls again after silence (no heartbeat: the pulls were lost) and at the end of a
        # backoff, and recreates the consumer when the server says it is gone.
        silence = 2 * self._heartbeat
        while not self._stopped:
            wake = self._last_activity + silence
            if self._paused_until:
                wake = min(wake, self._paused_until)
            with trio.move_on_at(wake):
                await self._rewatch.wait()
            if self._rewatch.is_set():
                self._rewatch = trio.Event()
            if self._stopped:
                return
            if self._gone is not None:
                await self._recover()
                self._pull()
                continue
            now = trio.current_time()
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
                self._pull()
            elif now >= self._last_activity + silence:
                self._last_activity = now
                if self.requested > 0:
                    log.debug(
                        "consumer %s: no heartbeat for %.1f s, pulling again", self.name, silence
                    )
                    self._reset()

    async def _recover(self) -> None:
        reason, self._gone = self._gone, None
        if self._recreate is None:
            raise ConsumerGone(f"consumer {self.stream}/{self.name}: {reason}")
        log.warning("consumer %s/%s: %s; recreating it", self.stream, self.name, reason)
        delay = 0.1
        while True:
            try:
                await self._recreate()
                break
            except NatrioError as exc:
                log.warning("recreating consumer %s failed: %r; retrying", self.name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.requested = 0

    async def stop(self) -> None:
        """Stop pulling and wait until every message the server already sent has arrived.

        Messages that arrive meanwhile still reach the sink, whose owner NAKs them when it
        is shutting down; then :meth:`run` returns.
        """
        self._pulling = False
        if self._inbox is not None:
            await self._inbox.drain()
        self._stopped = True
        self._rewatch.set()

    def statistics(self) -> dict[str, int]:
        """Window, held, requested, received and pulls sent."""
        return {
            "window": self.window,
            "held": self.held,
            "requested": self.requested,
            "received": self.received,
            "pulls": self.pulls,
        }
