"""One delivery of a task message, settled exactly once (ack, NAK or TERM) and released
exactly once, when both its runner and any pipelined recording are done with it. Free of I/O:
it sends through the function it is given."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .edge import ack_position
from .policy import nak_payload

if TYPE_CHECKING:
    import trio

    from .._context import TaskContext
    from .._transport import Message
    from .lease import Lease

log = logging.getLogger("natrio.dispatcher")

#: What a delivery is NAK'd with when it ends without an outcome (a recording that failed,
#: a fault of natrio's): soon, but not in a tight loop; doubled with every further delivery
#: up to :data:`MAX_UNSETTLED_DELAY`, so that a fault that repeats costs little.
UNSETTLED_DELAY = 1.0
MAX_UNSETTLED_DELAY = 300.0


def unsettled_delay(delivered: int) -> float:
    """The NAK delay of delivery number ``delivered`` that ended without an outcome."""
    return min(UNSETTLED_DELAY * 2.0 ** min(max(delivered - 1, 0), 16), MAX_UNSETTLED_DELAY)


class Delivery:
    """A task message from the moment it arrives until it is settled and released.

    ``settle`` sends at most one of ``+ACK``, ``-NAK`` or ``+TERM``; ``+WPI`` goes out only
    while unsettled. Whoever works on the delivery holds it (the runner from the start, a
    pipelined recording while the event is stored); when the last hold is let go, an
    unsettled delivery is NAK'd after :func:`unsettled_delay`, and ``on_release`` is
    called, once.
    """

    __slots__ = (
        "_holds",
        "_on_release",
        "_send",
        "announced",
        "cancelled_by_shutdown",
        "ctx",
        "deferred_until",
        "fenced",
        "group",
        "last_progress",
        "lease",
        "msg",
        "position",
        "renew",
        "route",
        "running",
        "scope",
        "settled",
    )

    def __init__(
        self,
        msg: Message,
        route: Any,
        group: str,
        *,
        send: Callable[[str, bytes], None],
        on_release: Callable[[Delivery], None],
        now: float,
        position: tuple[int, int] | None = None,
    ) -> None:
        self.msg = msg
        # (delivery count, stream sequence), read from the ack subject where it arrived.
        self.position = position or ack_position(msg.reply)
        self.route = route
        self.group = group
        self.last_progress = now
        self.scope: trio.CancelScope | None = None
        self.ctx: TaskContext | None = None
        self.cancelled_by_shutdown = False
        # Whether its handler is running now (what a shutdown out of grace cancels).
        self.running = False
        # Whether its started event went out.
        self.announced = False
        # Trio time a rate limit holds it until, or None: held, not settled, then tried again.
        self.deferred_until: float | None = None
        self.settled = False
        # The lease of an exclusive delivery (a partition's, a bounded type's), else None;
        # fenced: given up when the lease ran short, never to be settled from here.
        self.lease: Lease | None = None
        self.fenced = False
        # How an exclusive delivery's +WPI is sent (with a reply that renews its lease).
        self.renew: Callable[[Delivery, float], None] | None = None
        self._holds = 1
        self._send = send
        self._on_release = on_release

    @property
    def released(self) -> bool:
        """Whether every hold was let go."""
        return self._holds == 0

    # -- settlement -------------------------------------------------------------------

    def _send_safely(self, payload: bytes) -> bool:
        # A settlement that cannot be sent (the connection closed) is one the server will
        # redeliver after AckWait: logged, never raised into the runner or the read loop.
        try:
            self._send(self.msg.reply, payload)
        except Exception as exc:
            log.warning("could not send %r for %s: %r", payload[:5], self.msg.subject[:200], exc)
            return False
        return True

    def _settle(self, payload: bytes) -> bool:
        if self.settled:
            return False
        self.settled = True
        self._send_safely(payload)
        return True

    def ack(self) -> bool:
        """Acknowledge (done); False if it was already settled."""
        return self._settle(b"+ACK")

    def nak(self, delay: float = 0.0) -> bool:
        """Redeliver after ``delay`` seconds (finite, clamped); False if already settled."""
        return self._settle(nak_payload(delay))

    def term(self) -> bool:
        """Never redeliver; False if already settled."""
        return self._settle(b"+TERM")

    def in_progress(self, now: float) -> None:
        """Reset the server's ack timer (``+WPI``), unless already settled."""
        self.last_progress = now
        if self.settled:
            return
        if self.renew is not None:
            self.renew(self, now)  # a +WPI whose answer renews the lease
        else:
            self._send_safely(b"+WPI")

    def fence(self) -> None:
        """Give the delivery up: its lease may have run out, so the server may have handed
        it to another worker; nothing more is sent for it, and its handler is cancelled."""
        self.fenced = True
        self.settled = True
        if self.running and self.scope is not None:
            self.scope.cancel()

    # -- holds ------------------------------------------------------------------------

    def hold(self) -> None:
        """One more party works on the delivery (a pipelined recording)."""
        if self._holds == 0:
            raise RuntimeError("a released delivery cannot be held again")
        self._holds += 1

    def let_go(self) -> None:
        """One party is done; the last one settles what is unsettled and releases."""
        if self._holds == 0:
            return
        self._holds -= 1
        if self._holds == 0:
            if not self.settled:
                self.nak(unsettled_delay(self.position[0] if self.position else 1))
            self._on_release(self)
            # The context refers back to its delivery: without this the pair, the task and
            # its message would wait for the cycle collector (whose runs then cost more
            # per task than the rest of the dispatcher).
            self.ctx = None
