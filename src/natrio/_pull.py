"""The pull window's bookkeeping, free of I/O: what is asked for, and what each status reply means.

:class:`PullState` is what :class:`~natrio._consumer.PullConsumer` counts with, keeping
``held + requested <= window``. Every pull gets a reply subject of its own,
``<inbox>.<number>.<batch>``: JetStream addresses a pull's status replies to that subject,
so each status names the pull it ends, and the pull's number says whether it belongs to the
current epoch. When outstanding pulls are declared lost (reconnect, silence, leadership
change) :meth:`PullState.reset` starts a new epoch; a late status of an older one (a 408
at its expiry, ...) then changes nothing, where it used to cancel what the new pulls asked
for and let a second window go out.

Task messages cannot be told apart like that: the server delivers them with their stream
subject, not the pull's, and fills waiting pulls round-robin. Each is held and counts off
``requested`` (never below zero), an old epoch's too.

Protocol facts relied on (nats-server ``consumer.go``): a pull filled completely ends
without a status; a waiting pull that ends unfilled gets one status with
``Nats-Pending-Messages`` (how much of it is left): 408 at expiry, 423 ``Nats-Wrong-Pin-Id``
when its pin id went stale, 409 ``Server Shutdown``; a pull rejected outright gets a status
without it, nothing of it having been delivered (409 ``Exceeded MaxRequestBatch``, 423
``Nats-Pin-Id mismatch``, 400, and 503 from the server when nobody serves the consumer);
409 ``Leadership Change`` and ``Consumer Deleted`` end every pull, also without it.
"""

from __future__ import annotations

import enum

__all__ = ["Action", "PullState"]

_MAX_BACKOFF = 2.0
_FIRST_BACKOFF = 0.1
# 503s in a row (pulls nobody answered) after which the consumer is presumed gone.
_UNANSWERED_LIMIT = 3


class Action(enum.Enum):
    """What the driver does after a status reply (:meth:`PullState.on_status`)."""

    STALE = "stale"
    """The reply belongs to an older epoch's pull: nothing, not even liveness."""
    ALIVE = "alive"
    """A heartbeat of a current pull: the pulls are alive, nothing else changed."""
    PULL = "pull"
    """A pull ended (or all were lost): there may be room to pull again."""
    BACK_OFF = "back_off"
    """Pause pulling for :attr:`PullState.backoff` seconds, then pull again."""
    GONE = "gone"
    """The consumer is gone (:attr:`PullState.gone` says why): recreate it, then pull."""


class PullState:
    """Window accounting for one continuously pulled consumer.

    The driver asks :meth:`next_pull` how much to pull, records each pull it sends with
    :meth:`start` (which names its reply subject), and reports task messages with
    :meth:`delivered`, status replies with :meth:`on_status` and finished messages with
    :meth:`release`.
    """

    def __init__(self, window: int, reply_prefix: str = "") -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.threshold = max(1, window // 2)
        #: Prepended to ``<number>.<batch>`` to make a pull's reply subject (``"<inbox>."``).
        self.reply_prefix = reply_prefix
        #: Messages delivered and not yet released.
        self.held = 0
        #: Messages asked for and not yet received, by the current epoch's pulls.
        self.requested = 0
        #: Task messages delivered.
        self.received = 0
        #: Pulls started; also the number of the latest one.
        self.pulls = 0
        #: Bumped whenever the outstanding pulls are declared lost.
        self.epoch = 0
        #: Why the consumer is gone, until the driver has recreated it (:meth:`recreated`).
        self.gone: str | None = None
        #: The current back-off delay in seconds (0: not backing off).
        self.backoff = 0.0
        self._unanswered = 0
        # The number of the current epoch's first pull.
        self._first = 1
        self._pin_id: str | None = None
        # Pulls up to this number were sent before the current pin id was learnt.
        self._pin_since = 0

    @property
    def pin_id(self) -> str | None:
        """The pin id of a pinned-client priority group, as the server last handed it out."""
        return self._pin_id

    @pin_id.setter
    def pin_id(self, pin: str | None) -> None:
        if pin != self._pin_id:
            self._pin_id = pin
            self._pin_since = self.pulls

    # -- pulling ----------------------------------------------------------------------

    def next_pull(self) -> int:
        """How many messages to ask for now; 0 for none.

        Pulls come in halves of the window, but it never sits idle with room and nothing
        asked for.
        """
        free = self.window - self.held - self.requested
        if free >= self.threshold or (free > 0 and self.requested == 0):
            return free
        return 0

    def start(self, batch: int) -> str:
        """Record a pull of ``batch`` messages (sent with :attr:`pin_id`); its reply subject."""
        self.pulls += 1
        self.requested += batch
        return f"{self.reply_prefix}{self.pulls}.{batch}"

    def reset(self) -> None:
        """The outstanding pulls are lost (reconnect, silence, leadership change): forget them."""
        self.requested = 0
        self.epoch += 1
        self._first = self.pulls + 1

    def recreated(self) -> None:
        """The driver recreated the consumer after :attr:`gone`: pull afresh."""
        self.gone = None
        self.reset()

    def release(self, count: int = 1) -> None:
        """``count`` held messages reached their end (acked, NAK'd or terminated)."""
        self.held -= count

    # -- receiving --------------------------------------------------------------------

    def delivered(self) -> None:
        """A task message arrived: it is held from now on, and no longer requested."""
        self.held += 1
        self.received += 1
        self.backoff = 0.0
        self._unanswered = 0
        if self.requested > 0:
            self.requested -= 1

    def pull_of(self, subject: str) -> tuple[int, int] | None:
        """The number and batch of the current epoch's pull ``subject`` names, else None."""
        prefix = self.reply_prefix
        if not subject.startswith(prefix):
            return None
        number, _, batch = subject[len(prefix) :].partition(".")
        if not (number.isascii() and batch.isascii() and number.isdigit() and batch.isdigit()):
            return None
        n = int(number)
        if not self._first <= n <= self.pulls:
            return None
        return n, int(batch)

    def on_status(
        self, subject: str, status: str, description: str = "", pending: int | None = None
    ) -> Action:
        """A status reply on ``subject``; ``pending`` is its ``Nats-Pending-Messages``, if any.

        A status of an older epoch's pull is :attr:`Action.STALE` whatever it says: that
        pull was forgotten, and what it asked for is no part of ``requested`` any more.
        """
        pull = self.pull_of(subject)
        if pull is None:
            return Action.STALE
        if status == "100":
            return Action.ALIVE
        number, batch = pull
        if status == "409":
            if "Leadership Change" in description:
                # The new leader knows none of the pulls (and tells each of them so).
                self.reset()
                return Action.PULL
            if "Consumer Deleted" in description or "push based" in description:
                self.gone = description
                return Action.GONE
            self._ended(batch, pending)
            if pending is not None:
                # A waiting pull the server ended (Server Shutdown, ...): pull again.
                return Action.PULL
            # A rejected pull (Exceeded MaxRequestBatch, MaxRequestExpires, ...): ask
            # afresh after a back-off rather than in a hot loop.
            self._back_off()
            return Action.BACK_OFF
        if status == "400":
            self.gone = f"400 {description}".rstrip()
            return Action.GONE
        if status == "503":
            # No one answered for the consumer (an election, or the consumer is gone): the
            # pull never registered. Pull again after a back-off; after a few in a row,
            # make sure the consumer exists (recreating it is idempotent).
            self._ended(batch, None)
            self._unanswered += 1
            if self._unanswered >= _UNANSWERED_LIMIT:
                self._unanswered = 0
                self.gone = f"pulls unanswered ({status})"
                return Action.GONE
            self._back_off()
            return Action.BACK_OFF
        self._ended(batch, pending)
        if status == "423":
            # Another client holds the pin (or ours went stale): this pull is over. Forget
            # the pin it was sent with, not one learnt since, and keep pulling as a
            # standby: a pull without a pin id never gets a 423.
            if number > self._pin_since:
                self.pin_id = None
            return Action.PULL
        if status == "404" or status == "408":
            return Action.PULL
        # Unknown: that pull is over, but do not risk a hot loop of rejected pulls.
        self._back_off()
        return Action.BACK_OFF

    def _ended(self, batch: int, pending: int | None) -> None:
        # A pull ended: what it had not brought is no longer asked for. The server says
        # how much that is; without a count the pull was rejected before any delivery.
        left = batch if pending is None else min(pending, batch)
        self.requested = max(0, self.requested - left)

    def _back_off(self) -> None:
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF) if self.backoff else _FIRST_BACKOFF
