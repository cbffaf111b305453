"""The consumer: one JetStream pull consumer, pulled continuously, its messages handed to a sink.

natrio speaks the pull protocol itself rather than calling nats-py's ``fetch()`` (see
docs/concepts.md): pull requests are published to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>``,
each with a reply subject of its own under one wildcard inbox, messages and status replies
arrive there, and the consumer keeps ``held + requested <= window``, where ``held`` are
messages handed to the sink and not yet released and ``requested`` are messages asked for
and not yet received. The counting is :class:`~natrio._pull.PullState`'s; this module does
the I/O and the timing (backoffs, silence, recreating a lost consumer).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import trio

from ._errors import ConsumerGone, NatrioError
from ._pull import Action, PullState
from ._transport import Connection, Message, Subscription

log = logging.getLogger("natrio.consumer")

_NS = 1_000_000_000


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
        self.group = group
        self.sink = sink
        self._state = PullState(window)
        self._recreate = recreate
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
        self._last_activity = 0.0
        self._paused_until = 0.0
        self._rewatch = trio.Event()
        self._stopped = False
        self._stopping = False

    # -- the window, as PullState counts it ------------------------------------------

    @property
    def window(self) -> int:
        """At most this many messages held and asked for at once."""
        return self._state.window

    @property
    def held(self) -> int:
        """Messages handed to the sink and not yet released."""
        return self._state.held

    @property
    def requested(self) -> int:
        """Messages the live pulls may still bring."""
        return self._state.requested

    @property
    def received(self) -> int:
        """Task messages delivered so far."""
        return self._state.received

    @property
    def pulls(self) -> int:
        """Pull requests sent so far."""
        return self._state.pulls

    @property
    def pin_id(self) -> str | None:
        """The pin id of a pinned-client priority group, as the server last handed it out."""
        return self._state.pin_id

    @pin_id.setter
    def pin_id(self, value: str | None) -> None:
        self._state.pin_id = value

    # -- pulling ----------------------------------------------------------------------

    def _pull(self) -> None:
        state = self._state
        batch = state.next_pull()
        if not batch or not self._pulling or state.gone is not None:
            return
        if self._paused_until and trio.current_time() < self._paused_until:
            return
        if not self.conn.connected:
            # Queued for the reconnect, every such pull would go out on reconnect and
            # over-fill the window; the reconnect listener pulls once instead.
            return
        body = dict(self._pull_options, batch=batch)
        if state.pin_id is not None:
            body["id"] = state.pin_id
        reply = state.start(batch)
        self._last_activity = trio.current_time()
        self.conn.publish_nowait(self._pull_subject, json.dumps(body).encode(), reply=reply)

    def _reset(self) -> None:
        # Outstanding pulls are lost (reconnect, silence): ask afresh. Should one of them
        # live on after all, its late status no longer counts (see PullState).
        self._state.reset()
        self._pull()

    def release(self, count: int = 1) -> None:
        """``count`` held messages reached their end (acked, NAK'd or terminated)."""
        self._state.held -= count
        self._pull()

    @property
    def last_activity(self) -> float:
        """Trio time the consumer last heard from the server (a message or a status)."""
        return self._last_activity

    # -- receiving --------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        status = msg.status
        if status is not None:
            self._on_status(msg, status)
            return
        state = self._state
        state.delivered()
        self._last_activity = trio.current_time()
        if self.group is not None:
            pin = msg.header("Nats-Pin-Id")
            if pin and pin != state.pin_id:
                state.pin_id = pin
        assert self.sink is not None, "set PullConsumer.sink before run()"
        self.sink(msg)
        # A delivery leaves held + requested as it was (or, beyond what was asked for,
        # less room), except that the last message asked for may leave room less than the
        # pull threshold with nothing asked for.
        if not state.requested:
            self._pull()

    def _on_status(self, msg: Message, status: str) -> None:
        description = msg.header("Description", "") or ""
        raw = msg.header("Nats-Pending-Messages")
        pending = int(raw) if raw and raw.isascii() and raw.isdigit() else None
        state = self._state
        action = state.on_status(msg.subject, status, description, pending)
        if action is Action.STALE:
            # A forgotten pull's late status: it neither counts nor shows liveness.
            return
        self._last_activity = trio.current_time()
        if action is Action.PULL:
            self._pull()
        elif action is Action.BACK_OFF:
            if status != "503":
                log.warning("consumer %s: pull rejected: %s %s", self.name, status, description)
            self._paused_until = self._last_activity + state.backoff
            self._rewatch.set()
        elif action is Action.GONE:
            self._rewatch.set()  # the supervisor recreates the consumer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pull until :meth:`stop`; started once the inbox exists and the first pull is sent."""
        # Messages reach _on_message straight from the connection's read loop; this task
        # only watches for silence, backoffs and a lost consumer.
        prefix = self.conn.new_inbox()
        # Each pull replies to <prefix>.<number>.<batch> (see PullState.start).
        inbox = await self.conn.subscribe(prefix + ".*.*", on_message=self._on_message)
        self._inbox = inbox
        self._state.reply_prefix = prefix + "."
        self._state.reset()
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
                if not self._stopping:  # stop() drains, within its caller's bound
                    with trio.move_on_after(0.5):
                        await inbox.drain()
                await inbox.unsubscribe()

    async def _supervise(self) -> None:
        # Pulls again after silence (no heartbeat: the pulls were lost) and at the end of a
        # backoff, and recreates the consumer when the server says it is gone.
        silence = 2 * self._heartbeat
        state = self._state
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
            if state.gone is not None:
                await self._recover()
                self._pull()
                continue
            now = trio.current_time()
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
                self._pull()
            elif now >= self._last_activity + silence:
                self._last_activity = now
                if state.requested > 0:
                    log.debug(
                        "consumer %s: no heartbeat for %.1f s, pulling again", self.name, silence
                    )
                    self._reset()

    async def _recover(self) -> None:
        reason = self._state.gone
        if self._recreate is None:
            self._state.gone = None
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
        self._state.recreated()

    async def stop(self) -> None:
        """Stop pulling and wait until every message the server already sent has arrived.

        Messages that arrive meanwhile still reach the sink, whose owner NAKs them when it
        is shutting down; then :meth:`run` returns.
        """
        self._pulling = False
        self._stopping = True
        if self._inbox is not None:
            await self._inbox.drain()
        self._stopped = True
        self._rewatch.set()

    def stop_pulling(self) -> None:
        """Send no more pulls (at once, before :meth:`stop` gets to run)."""
        self._pulling = False

    def statistics(self) -> dict[str, int]:
        """Window, held, requested, received and pulls sent."""
        state = self._state
        return {
            "window": state.window,
            "held": state.held,
            "requested": state.requested,
            "received": state.received,
            "pulls": state.pulls,
        }
