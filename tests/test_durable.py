"""Durable execution: checkpoints, pause, signals, streaming, agent loops, deadlines,
timeouts, middleware and step hooks."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio

import natrio
from natrio import middleware
from natrio._outcomes import Reporter
from natrio.testing import WorkerFactory

from .helpers import event_counts
from .test_shutdown import submit_then_kill

FAST = natrio.RetryPolicy(initial_interval=0.1, backoff_coefficient=1.0, maximum_attempts=5)


async def checkpoint_value(nc: natrio.Connection, run_id: str, step_id: str) -> bytes | None:
    from natrio._state import StepState

    return await StepState(nc).load_checkpoint(run_id, step_id)


# -- checkpoints ------------------------------------------------------------------------


async def test_checkpoint_survives_a_sigkill_and_a_move(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    handle, _ = await submit_then_kill(
        natrio_server.url, natrio_client, "resumable", "CHECKPOINTED 3", run_id="job"
    )
    assert await checkpoint_value(natrio_connection, "job", "resumable") == b"3"
    worker = natrio_worker_factory(ack_wait=1.0)
    attempts: list[int] = []

    @worker.handle("resumable")
    async def resumable(ctx: natrio.TaskContext) -> bytes:
        attempts.append(ctx.attempt)
        saved = await ctx.load_checkpoint()
        start = int(saved) if saved else 0
        for item in range(start, 6):
            await ctx.checkpoint(str(item + 1).encode())
        return f"started at {start}".encode()

    await natrio_worker_factory.start(worker)
    assert await handle.result() == b"started at 3"
    assert attempts == [2]
    # The step is done, so its checkpoint is gone.
    assert await checkpoint_value(natrio_connection, "job", "resumable") is None


async def test_typed_checkpoint_and_keep_checkpoint(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory()
    loaded: list[Any] = []

    @worker.handle("keep", keep_checkpoint=True)
    async def keep(ctx: natrio.TaskContext) -> bytes:
        loaded.append(await ctx.load_checkpoint(dict))
        await ctx.checkpoint({"done": 7})
        loaded.append(await ctx.load_checkpoint(dict))
        return b""

    await natrio_worker_factory.start(worker)
    await (await natrio_client.submit("keep", run_id="k")).result()
    assert loaded == [None, {"done": 7}]
    assert json.loads(await checkpoint_value(natrio_connection, "k", "keep") or b"") == {"done": 7}


# -- pause ------------------------------------------------------------------------------


async def test_pause_keeps_the_attempt_and_resumes_after_the_delay(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    seen: list[tuple[int, bool, float, Any]] = []

    @worker.handle("nap")
    async def nap(ctx: natrio.TaskContext) -> bytes:
        seen.append((ctx.attempt, ctx.resumed, trio.current_time(), await ctx.load_checkpoint()))
        if len(seen) == 1:
            raise RuntimeError("fail once before pausing")
        if not ctx.resumed:
            await ctx.pause(1.0, checkpoint=b"half way")
        return b"rested"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("nap", run_id="p")
    assert await handle.result() == b"rested"
    (a1, r1, _, c1), (a2, r2, t2, c2), (a3, r3, t3, c3) = seen
    assert (a1, r1, c1) == (1, False, None)
    assert (a2, r2, c2) == (2, False, None)
    # Resumed: same attempt as before the pause, checkpoint there, after the delay.
    assert (a3, r3, c3) == (2, True, b"half way")
    assert 1.0 - 0.5 <= t3 - t2 <= 1.0 + 0.5
    assert await event_counts(natrio_connection, "paused") == {"natrio.event.nap.p.nap.paused": 1}


async def test_pauses_do_not_use_up_attempts(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=natrio.RetryPolicy(maximum_attempts=2))
    attempts: list[int] = []

    @worker.handle("naps")
    async def naps(ctx: natrio.TaskContext) -> bytes:
        attempts.append(ctx.attempt)
        if len(attempts) <= 4:
            await ctx.pause(0.05)
        return b"done"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("naps")).result() == b"done"
    assert attempts == [1, 1, 1, 1, 1]


# -- signals ----------------------------------------------------------------------------


async def test_signal_sent_before_during_and_after_the_wait(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    waiting = trio.Event()
    attempts: dict[str, list[int]] = {}

    @worker.handle("approve")
    async def approve(ctx: natrio.TaskContext) -> bytes:
        attempts.setdefault(ctx.run_id, []).append(ctx.attempt)
        timeout = 0.5 if ctx.run_id == "after" and ctx.attempt == 1 else 30
        if ctx.run_id == "during":
            waiting.set()
        return await ctx.wait_for_signal("approval", timeout)

    await natrio_worker_factory.start(worker)
    # Before: the signal exists before the task even starts.
    await natrio_client.send_signal("before", "approval", b"early")
    assert await (await natrio_client.submit("approve", run_id="before")).result() == b"early"
    # During: the handler is waiting.
    handle = await natrio_client.submit("approve", run_id="during")
    await waiting.wait()
    await natrio_client.send_signal("during", "approval", {"ok": True})
    assert json.loads(await handle.result()) == {"ok": True}
    # After: the first wait timed out (a retryable failure); the retry sees the signal.
    handle = await natrio_client.submit("approve", run_id="after")
    with trio.fail_after(10):
        failed = await natrio_connection.subscribe("natrio.event.approve.after.approve.failed")
        event = json.loads((await failed.receive()).data)
    assert (event["type"], event["kind"]) == ("SignalTimeout", "error")
    await natrio_client.send_signal("after", "approval", b"late")
    assert await handle.result() == b"late"
    assert attempts == {"before": [1], "during": [1], "after": [1, 2]}


async def test_signal_wait_limits(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    errors: list[BaseException] = []

    @worker.handle("bad-wait")
    async def bad_wait(ctx: natrio.TaskContext) -> bytes:
        for name, timeout in (("ok", 3601), ("ok", 0), ("bad.name", 1)):
            try:
                await ctx.wait_for_signal(name, timeout)
            except natrio.ConfigurationError as exc:
                errors.append(exc)
        return b""

    await natrio_worker_factory.start(worker)
    await (await natrio_client.submit("bad-wait")).result()
    assert len(errors) == 3
    with pytest.raises(natrio.ConfigurationError):
        await natrio_client.send_signal("run", "bad name")


# -- streaming --------------------------------------------------------------------------


async def test_stream_is_ordered_and_ends_with_the_step(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(retry=natrio.RetryPolicy(maximum_attempts=1))

    @worker.handle("chatty")
    async def chatty(ctx: natrio.TaskContext) -> bytes:
        for i in range(50):
            await ctx.put_stream(f"chunk {i}".encode())
        if ctx.input == b"fail":
            raise RuntimeError("after streaming")
        return b"said it all"

    await natrio_worker_factory.start(worker)
    async with natrio_client.stream("s1", "chatty") as chunks:
        handle = await natrio_client.submit("chatty", run_id="s1")
        received = [data async for data in chunks]
    assert received == [f"chunk {i}".encode() for i in range(50)]
    assert chunks.outcome == "completed"
    assert await handle.result() == b"said it all"
    async with natrio_client.stream("s2", "chatty") as chunks:
        await natrio_client.submit("chatty", b"fail", run_id="s2")
        assert len([data async for data in chunks]) == 50
    assert chunks.outcome == "dead"
    # A stream of a step that already ended ends at once.
    with trio.fail_after(2):
        assert [data async for data in natrio_client.stream("s1", "chatty")] == []


# -- agent loops ------------------------------------------------------------------------


async def test_agent_loop_with_a_retry_mid_loop(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)
    iterations: list[tuple[int, int]] = []

    @worker.handle_typed("think")
    async def think(ctx: natrio.TaskContext, notes: list[int]) -> list[int]:
        iterations.append((ctx.iteration, ctx.attempt))
        if ctx.iteration == 10 and ctx.attempt == 1:
            raise RuntimeError("flaky model")
        if ctx.iteration < 20:
            await ctx.continue_with([*notes, ctx.iteration])
        return notes

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("think", [], run_id="agent")
    assert await handle.result(list[int]) == list(range(1, 20))
    assert [i for i, _ in iterations] == [*range(1, 11), *range(10, 21)]
    assert (10, 2) in iterations
    assert await event_counts(natrio_connection, "continued") == {
        "natrio.event.think.agent.think.continued": 19
    }
    assert await event_counts(natrio_connection, "completed") == {
        "natrio.event.think.agent.think.completed": 1
    }


async def test_agent_loop_survives_a_sigkilled_worker(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    handle, _ = await submit_then_kill(
        natrio_server.url, natrio_client, "loop", "ITERATION 10", run_id="crash"
    )
    worker = natrio_worker_factory(ack_wait=1.0)
    seen: list[int] = []

    @worker.handle("loop")
    async def loop(ctx: natrio.TaskContext) -> bytes:
        seen.append(ctx.iteration)
        if ctx.iteration < 20:
            await ctx.continue_with(ctx.input + b".")
        return ctx.input

    await natrio_worker_factory.start(worker)
    assert await handle.result() == b"." * 19
    assert seen == list(range(10, 21))
    assert await event_counts(natrio_connection, "continued") == {
        "natrio.event.loop.crash.loop.continued": 19
    }


async def test_re_enqueue_happens_once_when_an_iteration_runs_twice(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    from natrio._dispatch.edge import read_task

    await natrio_client.submit("twice", b"first", run_id="r")
    info = await natrio_client.js.stream_info("NATRIO_TASKS")
    assert info["state"]["messages"] == 1
    # Both executions of iteration 1 of the same task message re-enqueue iteration 2.
    msg = natrio.Message(
        "natrio.task.twice.default.r.twice", b"first", "$JS.ACK.NATRIO_TASKS.x.1.1.1.0.0", {}
    )
    task = read_task(msg, task_type="twice", group="default", inbox_prefix="_INBOX")
    reporter = Reporter(natrio_connection, "test")
    await reporter.continued(task, msg.subject, b"second")
    await reporter.continued(task, msg.subject, b"second")
    info = await natrio_client.js.stream_info("NATRIO_TASKS")
    assert info["state"]["messages"] == 2


async def test_a_redelivered_iteration_the_loop_moved_past_is_not_run_again(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    # The state a crash leaves when an iteration's ack is lost while the loop goes on:
    # iteration 1 continued, and so did iteration 2 (the step's last continued event).
    from natrio._dispatch.edge import read_task

    first = await natrio_client.submit("moved", b"1", run_id="r")
    assert first.seq is not None
    subject = "natrio.task.moved.default.r.moved"
    reporter = Reporter(natrio_connection, "test")

    def task_at(seq: int, iteration: int, delivered: int) -> natrio.Task:
        headers = {"Natrio-Iteration": str(iteration)} if iteration > 1 else {}
        msg = natrio.Message(
            subject, b"", f"$JS.ACK.NATRIO_TASKS.moved.{delivered}.{seq}.{seq}.0.0", headers
        )
        return read_task(msg, task_type="moved", group="default", inbox_prefix="_INBOX")

    await reporter.continued(task_at(first.seq, 1, 1), subject, b"2")
    info = await natrio_client.js.stream_info("NATRIO_TASKS")
    second_seq = info["state"]["last_seq"]
    await reporter.continued(task_at(second_seq, 2, 1), subject, b"3")
    assert await reporter.finish_if_done(task_at(first.seq, 1, 2)) == "ack"
    assert await reporter.finish_if_done(task_at(second_seq, 2, 2)) == "ack"
    # The newest iteration has no outcome yet: it runs.
    third_seq = (await natrio_client.js.stream_info("NATRIO_TASKS"))["state"]["last_seq"]
    assert await reporter.finish_if_done(task_at(third_seq, 3, 2)) is None


async def test_max_iterations_ends_a_runaway_loop(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("forever", max_iterations=5)
    async def forever(ctx: natrio.TaskContext) -> None:
        await ctx.continue_with(b"again")

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("forever")).result()
    assert (info.value.error.kind, info.value.error.type) == ("iterations", "MaxIterationsExceeded")


# -- deadlines and timeouts -------------------------------------------------------------


async def test_deadline_passed_before_the_task_runs(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()
    ran = False

    @worker.handle("late")
    async def late(ctx: natrio.TaskContext) -> bytes:
        nonlocal ran
        ran = True
        return b""

    handle = await natrio_client.submit("late", deadline=0.2)
    await trio.sleep(0.3)  # let the deadline pass while no worker runs
    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await handle.result()
    assert info.value.error.kind == "deadline"
    assert not ran


async def test_deadline_passing_while_the_handler_runs(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory()

    @worker.handle("slow")
    async def slow(ctx: natrio.TaskContext) -> bytes:
        await trio.sleep(30)
        return b""

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("slow", deadline=0.5)
    with trio.fail_after(5), pytest.raises(natrio.TaskFailed) as info:
        await handle.result()
    assert info.value.error.kind == "deadline"


async def test_a_deadline_ends_with_its_task(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    # One runner serves task after task in one cancel scope: a task's deadline must not
    # outlive it, whether the task failed, completed itself, or finished as it fired.
    worker = natrio_worker_factory(concurrency=1, retry=natrio.RetryPolicy(maximum_attempts=1))

    @worker.handle("quick")
    async def quick(ctx: natrio.TaskContext) -> bytes:
        if ctx.run_id == "fails":
            raise RuntimeError("no")
        if ctx.run_id == "completes-itself":
            await ctx.complete(b"done")
        return b"done"

    @worker.handle("unhurried")
    async def unhurried(ctx: natrio.TaskContext) -> bytes:
        await trio.sleep(0.8)
        return b"no deadline"

    await natrio_worker_factory.start(worker)
    for run_id in ("fails", "completes-itself", "returns"):
        handle = await natrio_client.submit("quick", run_id=run_id, deadline=0.3)
        with contextlib.suppress(natrio.TaskFailed):
            await handle.result()
        # The next task, without a deadline, outlives the previous one's deadline.
        after = await natrio_client.submit("unhurried", run_id=f"after-{run_id}")
        with trio.fail_after(5):
            assert await after.result() == b"no deadline"


async def test_handler_timeout_is_a_retryable_failure(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("bounded", timeout=0.2)
    async def bounded(ctx: natrio.TaskContext) -> bytes:
        if ctx.attempt == 1:
            await trio.sleep(5)
        return b"in time"

    await natrio_worker_factory.start(worker)
    handle = await natrio_client.submit("bounded", run_id="t")
    assert await handle.result() == b"in time"
    msg = await natrio_client.js.last_message(
        "NATRIO_EVENTS", "natrio.event.bounded.t.bounded.failed"
    )
    assert msg is not None
    assert json.loads(msg.data)["kind"] == "timeout"


async def test_handler_swallowing_cancellation_does_not_block_shutdown(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    worker = natrio.Worker(natrio_connection, shutdown_grace=0.2)
    started = trio.Event()

    @worker.handle("stubborn")
    async def stubborn(ctx: natrio.TaskContext) -> bytes:
        started.set()
        try:  # noqa: SIM105 - spelled out: this is the anti-pattern under test
            await trio.sleep(30)
        except trio.Cancelled:
            pass  # swallowed: a bad idea, which must still not hang the worker
        return b"swallowed"

    await natrio_client.submit("stubborn")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await started.wait()
        stop_at = trio.current_time()
        worker.stop()
    assert trio.current_time() - stop_at < 0.2 + 1.0


# -- middleware and hooks ---------------------------------------------------------------


async def test_middleware_order_and_error_containment(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    trail: list[str] = []
    observed: list[tuple[str, str]] = []

    def recording(name: str) -> middleware.Middleware:
        def wrap(call: middleware.Next) -> middleware.Next:
            async def wrapped(invocation: middleware.Invocation) -> Any:
                trail.append(f"{name}>")
                if invocation.task.input == b"explode" and name == "inner":
                    raise RuntimeError("middleware broke")
                try:
                    return await call(invocation)
                finally:
                    trail.append(f"<{name}")

            return wrapped

        return wrap

    def observe(invocation: middleware.Invocation, outcome: str, duration: float) -> None:
        observed.append((invocation.task.run_id, outcome))

    worker = natrio_worker_factory(
        retry=natrio.RetryPolicy(maximum_attempts=1),
        middleware=[middleware.metrics(observe), recording("outer")],
    )
    worker.use(recording("inner"))
    worker.use(middleware.log())

    @worker.handle("mw")
    async def mw(ctx: natrio.TaskContext) -> bytes:
        trail.append("handler")
        return b"ok"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("mw", run_id="a")).result() == b"ok"
    assert trail == ["outer>", "inner>", "handler", "<inner", "<outer"]
    with pytest.raises(natrio.TaskFailed, match="middleware broke"):
        await (await natrio_client.submit("mw", b"explode", run_id="b")).result()
    assert await (await natrio_client.submit("mw", run_id="c")).result() == b"ok"
    assert observed == [("a", "ok"), ("b", "error"), ("c", "ok")]


async def test_timeout_middleware(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    worker = natrio_worker_factory(
        retry=natrio.RetryPolicy(maximum_attempts=1), middleware=[middleware.timeout(0.1)]
    )

    @worker.handle("sleepy")
    async def sleepy(ctx: natrio.TaskContext) -> bytes:
        await trio.sleep(5)
        return b""

    await natrio_worker_factory.start(worker)
    with pytest.raises(natrio.TaskFailed) as info:
        await (await natrio_client.submit("sleepy")).result()
    assert info.value.error.type == "HandlerTimeout"
    with pytest.raises(natrio.ConfigurationError):
        middleware.timeout(0)


class Hooks:
    def __init__(self, fail_first_done: bool = False) -> None:
        self.done: list[tuple[str, bytes]] = []
        self.failed: list[tuple[str, str]] = []
        self.fail_first_done = fail_first_done

    async def on_step_done(self, task: natrio.Task, output: bytes) -> None:
        if self.fail_first_done:
            self.fail_first_done = False
            raise RuntimeError("hook storage down")
        self.done.append((task.run_id, output))

    async def on_step_failed(self, task: natrio.Task, error: natrio.TaskError) -> None:
        self.failed.append((task.run_id, error.kind))


async def test_hooks_run_once_per_terminal_outcome(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    hooks = Hooks()
    worker = natrio_worker_factory(retry=FAST, hooks=hooks)

    @worker.handle("hooked")
    async def hooked(ctx: natrio.TaskContext) -> bytes:
        if ctx.input == b"dead":
            raise natrio.Fatal("no")
        if ctx.attempt < 3:
            raise RuntimeError("retry me")
        return b"ok"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("hooked", run_id="retried")).result() == b"ok"
    with pytest.raises(natrio.TaskFailed):
        await (await natrio_client.submit("hooked", b"dead", run_id="dead")).result()
    assert hooks.done == [("retried", b"ok")]
    assert hooks.failed == [("dead", "fatal")]


async def test_failing_hook_causes_redelivery(
    natrio_worker_factory: WorkerFactory,
    natrio_client: natrio.Client,
    natrio_connection: natrio.Connection,
) -> None:
    hooks = Hooks(fail_first_done=True)
    worker = natrio_worker_factory(retry=FAST, hooks=hooks)
    runs: list[int] = []

    @worker.handle("hooked")
    async def hooked(ctx: natrio.TaskContext) -> bytes:
        runs.append(ctx.attempt)
        return b"ok"

    await natrio_worker_factory.start(worker)
    assert await (await natrio_client.submit("hooked", run_id="h")).result() == b"ok"
    assert runs == [1, 2]
    assert hooks.done == [("h", b"ok")]
    assert await event_counts(natrio_connection, "completed") == {
        "natrio.event.hooked.h.hooked.completed": 1
    }


async def test_bad_hooks_and_options_fail_at_construction(
    natrio_connection: natrio.Connection,
) -> None:
    with pytest.raises(natrio.ConfigurationError, match="on_step_done"):
        natrio.Worker(natrio_connection, hooks=object())  # type: ignore[arg-type]
    worker = natrio.Worker(natrio_connection)
    with pytest.raises(natrio.ConfigurationError):
        worker.handle("a", _noop, timeout=0)
    with pytest.raises(natrio.ConfigurationError):
        worker.handle("b", _noop, max_iterations=0)
    with pytest.raises(natrio.ConfigurationError):
        worker.use("not callable")  # type: ignore[arg-type]


async def _noop(ctx: natrio.TaskContext) -> bytes:
    return b""


async def test_hung_hook_times_out_and_the_task_is_redelivered(
    natrio_worker_factory: WorkerFactory, natrio_client: natrio.Client
) -> None:
    calls: list[str] = []

    class SlowOnce:
        async def on_step_done(self, task: natrio.Task, output: bytes) -> None:
            calls.append(task.run_id)
            if len(calls) == 1:
                await trio.sleep(3600)

        async def on_step_failed(self, task: natrio.Task, error: natrio.TaskError) -> None:
            raise AssertionError("not expected")

    worker = natrio_worker_factory(retry=FAST, hooks=SlowOnce(), hook_timeout=0.2)

    @worker.handle("hooked")
    async def hooked(ctx: natrio.TaskContext) -> bytes:
        return b"ok"

    await natrio_worker_factory.start(worker)
    with trio.fail_after(10):
        assert await (await natrio_client.submit("hooked", run_id="slow")).result() == b"ok"
    assert calls == ["slow", "slow"]
