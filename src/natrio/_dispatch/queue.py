"""The dispatcher's queue of deliveries, which wakes idle runners one at a time.

A memory channel hands each item to a parked receiver of its own, so a batch of 100
tasks wakes 100 runner tasks: 100 task switches even when every handler finishes without
ever waiting. This queue wakes one idle runner when work arrives, and a runner that takes
an item while more are queued wakes one more before it runs it. A runner whose handler
never waits goes on to the next item itself; one whose handler waits has already woken
the next, which takes the next item. So the concurrency is the same, and the switches
follow the handlers that wait rather than the items.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class Closed(Exception):
    """The queue was closed: the runner asking for more work should end."""


class RunnerQueue(Generic[T]):
    """FIFO items for a fixed set of runner tasks; unbounded, never blocks ``put``."""

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._idle: collections.deque[trio.lowlevel.Task] = collections.deque()
        # An idle runner woken but not yet running: one at a time is enough, it wakes
        # the next if it finds more than one item.
        self._waking = False
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def put(self, item: T) -> None:
        """Queue ``item``; raises trio.ClosedResourceError once closed."""
        if self._closed:
            raise trio.ClosedResourceError("the queue is closed")
        self._items.append(item)
        self._wake_one()

    def take_nowait(self) -> T | None:
        """The next item, or None when there is none; raises :class:`Closed` once closed
        and empty. Taking one while more are queued wakes another idle runner for them."""
        items = self._items
        if not items:
            if self._closed:
                raise Closed
            return None
        item = items.popleft()
        if items:
            self._wake_one()
        return item

    async def take(self) -> T:
        """The next item, waiting while there is none; raises :class:`Closed` once closed
        and empty. Not a cancellation point while an item is ready (it still yields)."""
        item = self.take_nowait()
        if item is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while True:
            task = trio.lowlevel.current_task()
            self._idle.append(task)

            def abort(_: object, task: trio.lowlevel.Task = task) -> trio.lowlevel.Abort:
                with contextlib.suppress(ValueError):  # woken meanwhile: passed on below
                    self._idle.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            try:
                await trio.lowlevel.wait_task_rescheduled(abort)
            except trio.Cancelled:
                if self._waking and task not in self._idle:
                    self._waking = False
                    self._wake_one()
                raise
            self._waking = False
            item = self.take_nowait()
            if item is not None:
                return item
            # Someone else took it first: wait again.

    def close(self) -> None:
        """Refuse further items; idle runners wake and end once the queue is empty."""
        self._closed = True
        while self._idle:
            trio.lowlevel.reschedule(self._idle.popleft(), outcome.Value(None))

    def drain(self) -> list[T]:
        """Take every queued item at once."""
        items = list(self._items)
        self._items.clear()
        return items

    def _wake_one(self) -> None:
        if not self._waking and self._idle:
            self._waking = True
            trio.lowlevel.reschedule(self._idle.popleft(), outcome.Value(None))
