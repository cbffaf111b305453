"""The dispatcher's queue: FIFO, one idle runner woken at a time, and every runner ends on close."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from natrio._dispatch.queue import Closed, RunnerQueue


async def test_items_come_out_in_order_and_take_nowait_says_when_there_are_none() -> None:
    queue: RunnerQueue[int] = RunnerQueue()
    assert queue.take_nowait() is None
    for item in range(5):
        queue.put(item)
    assert len(queue) == 5
    assert [queue.take_nowait() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert queue.take_nowait() is None


async def test_one_put_wakes_one_idle_runner_and_a_taker_wakes_the_next() -> None:
    queue: RunnerQueue[int] = RunnerQueue()
    taken: list[tuple[int, int]] = []

    async def runner(name: int) -> None:
        while True:
            try:
                taken.append((name, await queue.take()))
            except Closed:
                return

    async with trio.open_nursery() as nursery:
        for name in range(4):
            nursery.start_soon(runner, name)
        await trio.testing.wait_all_tasks_blocked()
        queue.put(1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(taken) == 1  # one runner took it; the others stay idle
        for item in range(2, 9):
            queue.put(item)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(item for _, item in taken) == list(range(1, 9))
        assert len({name for name, _ in taken}) > 1  # the work spread to other runners
        queue.close()
    assert queue.closed


async def test_close_ends_idle_runners_once_the_queue_is_empty() -> None:
    queue: RunnerQueue[int] = RunnerQueue()
    queue.put(7)
    queue.close()
    assert await queue.take() == 7  # what was queued is still taken
    with pytest.raises(Closed):
        await queue.take()
    with pytest.raises(trio.ClosedResourceError):
        queue.put(8)
    assert queue.drain() == []


async def test_a_cancelled_idle_runner_leaves_the_others_to_be_woken() -> None:
    queue: RunnerQueue[int] = RunnerQueue()
    got: list[int] = []

    async def taker(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            got.append(await queue.take())

    async with trio.open_nursery() as nursery:
        first = await nursery.start(taker)
        await nursery.start(taker)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        queue.put(1)  # the cancelled one is no longer idle: the other takes it
        await trio.testing.wait_all_tasks_blocked()
        assert got == [1]
