"""Leases of exclusive deliveries: until when the server surely keeps a partition's or a
bounded task type's delivery with this worker, as round trips prove it.

A worker cut off from the server (a network partition, a stalled link) keeps running its
handlers, while the server, hearing no ``+WPI``, hands the task to another member once
the ack wait runs out. For a task type whose consumer lets one task out at a time (a
partition, a singleton, ``max_in_flight``) that would be two executions at once, so such
executions are *fenced*: cancelled, and left unsettled, before the server could give them
to anyone else.

What a worker can prove, with its own clock (the server's timer starts no earlier than
the events below, so the bounds are on the safe side):

- A *probe* is a request sent at ``Q`` and answered. The server writes to a connection in
  order, so a delivery that arrives after the answer was sent by the server after it saw
  the probe: its ack timer started after ``Q``. That starts a lease.
- An exclusive delivery's ``+WPI`` is sent with a reply subject: the consumer answers it
  once it has processed it (on the consumer's leader, in a cluster). A ``+WPI`` sent at
  ``t`` and answered before the lease ends restarted the server's timer at or after
  ``t``: the lease then ends one ack wait after ``t``.

Nothing here does I/O; the dispatcher sends the probes and keep-alives and asks.
"""

from __future__ import annotations

import math

#: A lease is fenced once less than this share of the ack wait is left of it.
FENCE_SHARE = 1 / 3


class Lease:
    """One exclusive delivery's lease: when it surely ends."""

    __slots__ = ("ack_wait", "ends")

    def __init__(self, proven_since: float, ack_wait: float) -> None:
        self.ack_wait = ack_wait
        #: The time by which the server may have given the delivery to another consumer.
        self.ends = proven_since + ack_wait

    def renewed(self, sent: float, answered: float) -> None:
        """A ``+WPI`` sent at ``sent`` was answered (processed) at ``answered``."""
        if answered < self.ends:
            self.ends = max(self.ends, sent + self.ack_wait)

    def fenced(self, now: float) -> bool:
        """Whether the execution must stop now: too little of the lease is left."""
        return now >= self.ends - self.ack_wait * FENCE_SHARE


class Prober:
    """The probes of one connection: how many are out, and the newest one answered.

    A probe goes out on every keep-alive tick (several may be out at once on a slow
    link); one that outlived a disconnect or a reconnect proves nothing, and neither does
    a ``+WPI`` answered after one (``epoch``).
    """

    __slots__ = ("answered_sent", "epoch", "outstanding")

    #: Probes awaiting their answers beyond which no more are sent (a dead link).
    MAX_OUTSTANDING = 8

    def __init__(self) -> None:
        #: The send time of the newest probe answered so far (-inf: none yet).
        self.answered_sent = -math.inf
        #: Probes awaiting their answers.
        self.outstanding = 0
        #: Counts disconnects and reconnects.
        self.epoch = 0

    def due(self) -> bool:
        """Whether a probe may be sent now; counts it as out."""
        if self.outstanding >= self.MAX_OUTSTANDING:
            return False
        self.outstanding += 1
        return True

    def settled(self, epoch: int) -> None:
        """A probe of ``epoch`` was answered or failed."""
        if epoch == self.epoch and self.outstanding:
            self.outstanding -= 1

    def answered(self, sent: float, epoch: int) -> None:
        """A probe sent at ``sent`` (in ``epoch``) was answered."""
        if epoch == self.epoch:
            self.answered_sent = max(self.answered_sent, sent)

    def link_changed(self) -> None:
        """The link was lost, or made again: what was sent on the old one proves nothing."""
        self.epoch += 1
        self.outstanding = 0

    def lease(self, ack_wait: float) -> Lease:
        """The lease of an exclusive delivery arriving now."""
        return Lease(self.answered_sent, ack_wait)
