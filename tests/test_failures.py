"""Failures: retries with exact attempts and delays, dead letters, Fatal, bad input."""

from __future__ import annotations

import itertools
import json

import attrs
import pytest
import trio

import natrio
from natrio.testing import WorkerFactory

from .helpers import consumer_state, event_counts

FAST = natrio.RetryPolicy(initial_interval=0.2, backoff_coefficient=2.0, maximum_attempts=3)


async def test_retries_then_dead_letter_with_exact_delays(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    starts: list[tuple[int, float]] = []

    @worker.handle("flaky")
    async def flaky(ctx: natrio.TaskContext) -> bytes:
        starts.append((ctx.attempt, trio.current_time()))
        raise ValueError(f"boom {ctx.attempt}")

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("flaky", b"in", run_id="r", step_id="s", headers={"K": "v"})
    with pytest.raises(natrio.TaskFailed) as info:
        await handle.result()
    error = info.value.error
    assert (error.type, error.message, error.kind, error.attempts) == (
        "ValueError",
        "boom 3",
        "exhausted",
        3,
    )
    assert "Traceback" in error.traceback
    assert "boom 3" in error.traceback
    assert [a for a, _ in starts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(starts)]
    # 0.2 s then 0.4 s, as NAK delays computed by the worker; allow scheduling slack.
    assert 0.2 <= gaps[0] < 0.2 + 0.5
    assert 0.4 <= gaps[1] < 0.4 + 0.5
    (entry,) = [e async for e in natrio_client.dead_letters("flaky")]
    assert (entry.run_id, entry.step_id, entry.group, entry.attempts) == ("r", "s", "default", 3)
    assert entry.input == b"in"
    assert entry.headers["K"] == "v"
    assert entry.worker_id == worker.worker_id
    assert entry.error == error
    assert sum((await event_counts(natrio_connection, "failed")).values()) == 2
    assert sum((await event_counts(natrio_connection, "dead")).values()) == 1
    assert await consumer_state(natrio_connection, "flaky") == {"ack_pending": 0, "pending": 0}


async def test_fatal_and_fail_permanent_skip_retries(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    attempts: list[str] = []

    @worker.handle("fatal")
    async def fatal(ctx: natrio.TaskContext) -> None:
        attempts.append("fatal")
        raise natrio.Fatal(KeyError("missing"))

    @worker.handle("permanent")
    async def permanent(ctx: natrio.TaskContext) -> None:
        attempts.append("permanent")
        await ctx.fail_permanent(RuntimeError("no"))

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("fatal")).result()
    assert (info.value.error.type, info.value.error.kind, info.value.error.attempts) == (
        "KeyError",
        "fatal",
        1,
    )
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("permanent")).result()
    assert (info.value.error.type, info.value.error.message, info.value.error.kind) == (
        "RuntimeError",
        "no",
        "fatal",
    )
    assert attempts == ["fatal", "permanent"]


async def test_non_retryable_types(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=attrs.evolve(FAST, non_retryable=(LookupError,)))
    attempts = 0

    @worker.handle("lookup")
    async def lookup(ctx: natrio.TaskContext) -> None:
        nonlocal attempts
        attempts += 1
        raise IndexError("subclass of LookupError")

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed, match="IndexError"):
        await (await natrio_client.submit("lookup")).result()
    assert attempts == 1


async def test_retry_after_and_retryable_delay(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(
        retry=natrio.RetryPolicy(initial_interval=30, maximum_attempts=5)
    )
    starts: dict[str, list[float]] = {"after": [], "retryable": []}

    @worker.handle("after")
    async def after(ctx: natrio.TaskContext) -> bytes:
        starts["after"].append(trio.current_time())
        if ctx.attempt == 1:
            await ctx.fail_retry_after(RuntimeError("later"), 0.3)
        return b"ok"

    @worker.handle("retryable")
    async def retryable(ctx: natrio.TaskContext) -> bytes:
        starts["retryable"].append(trio.current_time())
        if ctx.attempt == 1:
            raise natrio.Retryable("rate limited", delay=0.3)
        return b"ok"

    await natrio_worker_factory.start(worker)
    for task_type in ("after", "retryable"):
        assert await (await natrio_client.submit(task_type)).result() == b"ok"
        first, second = starts[task_type]
        # The explicit delay wins over the policy's 30 s.
        assert 0.3 <= second - first < 0.3 + 0.5


async def test_policy_precedence_task_over_handler_over_worker(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(
        retry=attrs.evolve(FAST, maximum_attempts=4, initial_interval=0.05)
    )
    attempts: dict[str, int] = {}

    async def failing(ctx: natrio.TaskContext) -> None:
        attempts[ctx.run_id] = ctx.attempt
        raise RuntimeError("again")

    worker.handle("w", failing)
    worker.handle("h", failing, retry=natrio.RetryPolicy(initial_interval=0.05, maximum_attempts=2))
    await natrio_worker_factory.start(worker)
    cases = {
        "worker": ("w", None, 4),
        "handler": ("h", None, 2),
        "task": ("h", natrio.RetryPolicy(initial_interval=0.05, maximum_attempts=3), 3),
    }
    for run_id, (task_type, retry, expected) in cases.items():
        with pytest.raises(natrio.TaskFailed):
            await (await natrio_client.submit(task_type, run_id=run_id, retry=retry)).result()
        assert attempts[run_id] == expected, run_id


@attrs.frozen
class Order:
    id: int
    sku: str


async def test_undecodable_typed_input_fails_permanently_naming_the_field(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    ran = False

    @worker.handle_typed("order")
    async def order(ctx: natrio.TaskContext, value: Order) -> None:
        nonlocal ran
        ran = True

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("order", b'{"id": "x", "sku": "a"}')).result()
    error = info.value.error
    assert (error.kind, error.type, error.attempts) == ("decode", "DecodeError", 1)
    assert "Order" in error.message
    assert "$.id" in error.message
    with pytest.raises(natrio.TaskFailed, match="not JSON"):
        await (await natrio_client.submit("order", b"\xff\xfe")).result()
    assert not ran


async def test_unencodable_output_is_a_fatal_failure(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("bad-output")
    async def bad_output(ctx: natrio.TaskContext) -> object:
        return object()

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("bad-output")).result()
    assert info.value.error.kind == "fatal"


async def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("sturdy")
    async def sturdy(ctx: natrio.TaskContext) -> bytes:
        return b"fine"

    await natrio_worker_factory.start(worker)
    js = natrio_client.js
    dead = await natrio_connection.subscribe("natrio.dead.sturdy.>")
    # Published straight to the task subjects, bypassing the client.
    await js.publish("natrio.task.sturdy.default.only-run", b"x")
    await js.publish("natrio.task.sturdy.default.r.s.extra", b"x")
    await js.publish(
        "natrio.task.sturdy.default.r2.s2", b"x", headers={"Natrio-Retry": "{not json"}
    )
    await js.publish("natrio.task.sturdy.default.r3.s3", b"x", headers={"Natrio-Deadline": "soon"})
    assert await (await natrio_client.submit("sturdy")).result() == b"fine"
    with trio.fail_after(5):
        for _ in range(4):
            await dead.receive()
    entries = [e async for e in natrio_client.dead_letters("sturdy")]
    assert len(entries) == 4
    reasons = sorted(e.error.message for e in entries)
    assert all(e.error.kind == "malformed" for e in entries)
    assert any("Natrio-Retry" in r for r in reasons)
    assert any("Natrio-Deadline" in r for r in reasons)
    assert await consumer_state(natrio_connection, "sturdy") == {"ack_pending": 0, "pending": 0}


async def test_failed_event_records_the_retry(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("once-bad")
    async def once_bad(ctx: natrio.TaskContext) -> bytes:
        if ctx.attempt == 1:
            raise OSError("disk")
        return b"ok"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("once-bad", run_id="r", step_id="s")
    assert await handle.result() == b"ok"
    msg = await natrio_client.js.last_message("NATRIO_EVENTS", "natrio.event.once-bad.r.s.failed")
    assert msg is not None
    data = json.loads(msg.data)
    assert (data["type"], data["kind"], data["attempts"], data["retry_in"]) == (
        "OSError",
        "error",
        1,
        0.2,
    )
