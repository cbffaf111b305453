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

- A *probe* is a request sent at ``Q`` and answered at ``A``. The server writes to a
  connection in order, so a delivery that arrives after the answer was sent by the server
  after it saw the probe: its ack timer started after ``Q``.
- A ``+WPI`` sent at ``t`` before a probe sent at ``Q`` reached the server before the
  probe did (one connection, in order), so before ``A``. If ``A`` is before the delivery's
  proven expiry, the server still held the delivery for this worker then and restarted
  its timer at or after ``t``.

Nothing here does I/O; the dispatcher sends the probes and keep-alives and asks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: A lease is fenced once less than this share of the ack wait is left of it.
FENCE_SHARE = 1 / 3


class Lease:
    """One exclusive delivery's lease: when it surely ends, and the keep-alives that may
    move that end once a probe proves they arrived."""

    __slots__ = ("ack_wait", "ends", "renewals")

    def __init__(self, proven_since: float, ack_wait: float) -> None:
        self.ack_wait = ack_wait
        #: The time by which the server may have given the delivery to another consumer.
        self.ends = proven_since + ack_wait
        #: Send times of ``+WPI``\\ s no probe has proven yet (oldest first).
        self.renewals: list[float] = []

    def renewed(self, now: float) -> None:
        """A ``+WPI`` for the delivery was sent at ``now``."""
        self.renewals.append(now)

    def proven(self, probe_sent: float, probe_answered: float) -> None:
        """A probe sent at ``probe_sent`` was answered at ``probe_answered``."""
        latest = -math.inf
        kept = []
        for sent in self.renewals:
            if sent <= probe_sent:
                latest = sent
            else:
                kept.append(sent)
        self.renewals = kept
        if probe_answered < self.ends:
            self.ends = max(self.ends, latest + self.ack_wait)

    def fenced(self, now: float) -> bool:
        """Whether the execution must stop now: too little of the lease is left."""
        return now >= self.ends - self.ack_wait * FENCE_SHARE


class Prober:
    """The probes of one connection: how many are out, and the newest one answered.

    A probe goes out on every keep-alive tick (several may be out at once on a slow
    link, each proving what was sent before it); one that outlived a disconnect proves
    nothing, since what was written to the old link may never have arrived.
    """

    __slots__ = ("answered_sent", "epoch", "outstanding")

    #: Probes awaiting their answers beyond which no more are sent (a dead link).
    MAX_OUTSTANDING = 8

    def __init__(self) -> None:
        #: The send time of the newest probe answered so far (-inf: none yet).
        self.answered_sent = -math.inf
        #: Probes awaiting their answers.
        self.outstanding = 0
        #: Counts disconnects and reconnects: a probe sent in an earlier one proves nothing.
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

    def answered(self, sent: float, epoch: int, now: float, leases: Iterable[Lease]) -> None:
        """A probe sent at ``sent`` (in ``epoch``) was answered at ``now``: prove what it
        proves. One sent before a disconnect or reconnect proves nothing."""
        if epoch != self.epoch:
            return
        self.answered_sent = max(self.answered_sent, sent)
        for lease in leases:
            lease.proven(sent, now)

    def link_changed(self, leases: Iterable[Lease]) -> None:
        """The link was lost, or made again: what was written to the old one may never have
        arrived, so no probe proves the keep-alives sent before now."""
        self.epoch += 1
        self.outstanding = 0
        for lease in leases:
            lease.renewals.clear()

    def lease(self, ack_wait: float) -> Lease:
        """The lease of an exclusive delivery arriving now."""
        return Lease(self.answered_sent, ack_wait)
