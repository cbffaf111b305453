"""No message can stop a worker: one regression test per class of hostile input or fault.

Task messages are written as raw NATS protocol frames on a plain socket, as a client in
another language could publish them, bypassing natrio's client and its checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs
import pytest
import trio

import natrio
from natrio.testing import WorkerFactory

from .helpers import consumer_state

FAST = natrio.RetryPolicy(maximum_attempts=2, initial_interval=0.05, maximum_interval=0.05)


async def raw_publish(
    server: natrio.EmbeddedServer,
    subject: bytes,
    body: bytes = b"",
    headers: Mapping[bytes, bytes] | None = None,
    *,
    status_line: bytes = b"NATS/1.0",
) -> None:
    """Publish one message with hand-built protocol frames and wait for the stream's PubAck."""
    assert server.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        block = status_line + b"\r\n"
        for name, value in (headers or {}).items():
            block += name + b": " + value + b"\r\n"
        block += b"\r\n"
        frame = b"HPUB %s _INBOX.raw %d %d\r\n%s%s\r\n" % (
            subject,
            len(block),
            len(block) + len(body),
            block,
            body,
        )
        await stream.send_all(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
            b"SUB _INBOX.raw 1\r\n" + frame
        )
        seen = b""
        with trio.fail_after(5):
            # The PubAck comes back on the reply subject once the stream stored the message.
            while b"MSG _INBOX.raw" not in seen or not seen.endswith(b"\r\n"):
                chunk = await stream.receive_some()
                assert chunk, "the server closed the connection"
                assert b"-ERR" not in chunk, chunk
                seen += chunk
        assert b'"error"' not in seen, seen


async def settled(nc: natrio.Connection, task_type: str) -> None:
    """Wait until the task type's consumer holds nothing and has nothing pending."""
    # The server's consumer state has no event to wait for: poll it, bounded.
    with trio.fail_after(15):
        while await consumer_state(nc, task_type) != {"ack_pending": 0, "pending": 0}:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def echo(ctx: natrio.TaskContext) -> bytes:
    return ctx.input


async def start_echo(factory: WorkerFactory, **options: object) -> natrio.Worker:
    worker = factory(retry=FAST, **options)
    worker.handle("echo", echo)
    return await factory.start(worker)


async def canary(client: natrio.Client) -> None:
    with trio.fail_after(10):
        assert await (await client.submit("echo", b"canary")).result() == b"canary"


async def malformed_reasons(client: natrio.Client) -> list[str]:
    return [
        entry.error.message
        async for entry in client.dead_letters("echo")
        if entry.error.kind == "malformed"
    ]


async def test_long_values_cannot_close_the_connection(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    await start_echo(natrio_worker_factory)
    await raw_publish(
        natrio_server,
        b"natrio.task.echo.default.r1.s1",
        headers={b"Natrio-Reply": b"_INBOX." + b"x" * 5000, b"Nats-Msg-Id": b"1"},
    )
    await raw_publish(natrio_server, b"natrio.task.echo.default." + b"r" * 3000 + b".s")
    await settled(natrio_connection, "echo")
    assert not natrio_connection.closed
    await canary(natrio_client)
    reasons = await malformed_reasons(natrio_client)
    assert len(reasons) == 2
    assert any("Natrio-Reply is 5007 characters" in r for r in reasons)
    assert any("run id" in r for r in reasons)


@pytest.mark.parametrize("run_id", [b"a:b", b"a~b", b"a%b", "ä".encode(), b"x" * 129])
async def test_ids_outside_the_documented_syntax_are_dead_lettered(
    run_id: bytes,
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    ran: list[str] = []
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("echo")
    async def record(ctx: natrio.TaskContext) -> bytes:
        ran.append(ctx.run_id)
        return ctx.input

    await natrio_worker_factory.start(worker)
    await raw_publish(natrio_server, b"natrio.task.echo.default." + run_id + b".step")
    await settled(natrio_connection, "echo")
    await canary(natrio_client)
    assert ran == [ran[-1]]  # only the canary ran
    assert len(await malformed_reasons(natrio_client)) == 1


async def test_colliding_message_ids_cannot_drop_a_task(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    # With ':' allowed in ids, run "a:b"/step "c" and run "a"/step "b:c" shared message ids.
    await start_echo(natrio_worker_factory)
    await raw_publish(natrio_server, b"natrio.task.echo.default.a:b.c")
    await raw_publish(natrio_server, b"natrio.task.echo.default.a.b:c")
    await settled(natrio_connection, "echo")
    assert len(await malformed_reasons(natrio_client)) == 2


async def test_a_subject_that_is_not_utf8_is_settled(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    await start_echo(natrio_worker_factory)
    await raw_publish(natrio_server, b"natrio.task.echo.default.\xff\xfe.step")
    await settled(natrio_connection, "echo")
    [entry] = [e async for e in natrio_client.dead_letters("echo") if e.error.kind == "malformed"]
    assert entry.subject == "natrio.task.echo.default.\\xff\\xfe.step"
    assert entry.run_id == "malformed"
    await canary(natrio_client)


async def test_a_reply_subject_with_a_space_is_refused_without_stalling(
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = await start_echo(natrio_worker_factory, concurrency=1, prefetch=2)
    for n in range(4):  # more than prefetch: a stalled slot would hold the rest back
        await raw_publish(
            natrio_server,
            b"natrio.task.echo.default.r%d.s" % n,
            headers={b"Natrio-Reply": b"_INBOX.a b"},
        )
    await settled(natrio_connection, "echo")
    assert len(await malformed_reasons(natrio_client)) == 4
    await canary(natrio_client)
    assert worker.statistics().dispatcher.in_flight == 0


@pytest.mark.parametrize(
    "target", [b"$JS.API.STREAM.DELETE.NATRIO_EVENTS", b"$KV.natrio_checkpoints.stolen"]
)
async def test_replies_go_only_to_inbox_subjects(
    target: bytes,
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    await start_echo(natrio_worker_factory)
    await raw_publish(
        natrio_server, b"natrio.task.echo.default.deputy.s", b"", {b"Natrio-Reply": target}
    )
    # The task runs and its outcome is recorded; only the reply is left out.
    with trio.fail_after(10):
        assert await natrio_client.handle("echo", "deputy", "s").result() == b""
    info = await natrio_client.js.stream_info("NATRIO_EVENTS")
    assert info["config"]["name"] == "NATRIO_EVENTS"
    checkpoints = await natrio_client.js.stream_info("KV_natrio_checkpoints")
    assert checkpoints["state"]["messages"] == 0


@attrs.frozen
class Wanted:
    n: int


async def test_dead_letters_always_fit_and_keep_the_input(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("huge")
    async def huge(ctx: natrio.TaskContext) -> None:
        raise natrio.Fatal("x" * 2_000_000)

    await natrio_worker_factory.start(worker)
    payload = bytes(range(256)) * (natrio_connection.max_payload * 9 // 10 // 256)
    handle = await natrio_client.submit("huge", payload)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
        await handle.result()
    assert len(failed.value.error.message) <= 4096
    [entry] = [e async for e in natrio_client.dead_letters("huge")]
    assert entry.input == b""
    assert entry.input_ref is not None
    assert await natrio_client.dead_letter_input(entry) == payload
    assert await consumer_state(natrio_connection, "huge") == {"ack_pending": 0, "pending": 0}


async def test_a_deadline_passing_on_a_large_task_does_not_kill_the_runner(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = natrio_worker_factory(retry=FAST, concurrency=1)

    @worker.handle("slow")
    async def slow(ctx: natrio.TaskContext) -> None:
        await trio.sleep(30)

    worker.handle("echo", echo)
    await natrio_worker_factory.start(worker)
    payload = b"\x00" * (natrio_connection.max_payload * 9 // 10)
    handle = await natrio_client.submit("slow", payload, deadline=0.3)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
        await handle.result()
    assert failed.value.error.kind == "deadline"
    await canary(natrio_client)
    assert worker.statistics().dispatcher.in_flight == 0


@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt])
async def test_a_handler_raising_base_exceptions_is_a_failed_task(
    exception: type[BaseException],
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("exits")
    async def exits(ctx: natrio.TaskContext) -> None:
        raise exception("bye")

    worker.handle("echo", echo)
    await natrio_worker_factory.start(worker)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
        await (await natrio_client.submit("exits")).result()
    assert (failed.value.error.type, failed.value.error.kind) == (exception.__name__, "exhausted")
    await canary(natrio_client)
    assert worker.statistics().running


async def test_a_connection_closed_for_good_ends_run(
    natrio_server: natrio.EmbeddedServer, natrio_connection: natrio.Connection
) -> None:
    async with natrio.connect(
        natrio_server.url, max_reconnect_attempts=1, reconnect_time_wait=0.1
    ) as nc:
        worker = natrio.Worker(nc, shutdown_grace=30)
        worker.handle("echo", echo)
        ended: list[BaseException] = []

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                await worker.run(task_status=task_status)
            except natrio.ConnectionClosed as exc:
                ended.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                natrio_server.kill()
        assert ended, "run() returned without the error"
        assert not worker.statistics().running


async def test_policy_exceptions_inside_a_nursery_are_honoured(
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    worker = natrio_worker_factory(retry=natrio.RetryPolicy(maximum_attempts=5))
    attempts: list[int] = []

    @worker.handle("fatal")
    async def fatal(ctx: natrio.TaskContext) -> None:
        attempts.append(ctx.attempt)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raise, natrio.Fatal(ValueError("no")))

    @worker.handle("later")
    async def later(ctx: natrio.TaskContext) -> bytes:
        if ctx.attempt == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_raise, natrio.Retryable("soon", delay=0.2))
        return b"done"

    await natrio_worker_factory.start(worker)
    with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
        await (await natrio_client.submit("fatal")).result()
    assert (failed.value.error.kind, failed.value.error.type) == ("fatal", "ValueError")
    assert attempts == [1]
    with trio.fail_after(10):
        assert await (await natrio_client.submit("later", run_id="later")).result() == b"done"
    failed_event = await natrio_client.js.last_message(
        "NATRIO_EVENTS", "natrio.event.later.later.later.failed"
    )
    assert failed_event is not None
    assert json.loads(failed_event.data)["retry_in"] == 0.2


async def _raise(exc: BaseException) -> None:
    raise exc


async def test_a_handler_running_on_after_complete_is_bounded_by_shutdown(
    natrio_connection: natrio.Connection, natrio_client: natrio.Client
) -> None:
    worker = natrio.Worker(natrio_connection)
    cancelled = trio.Event()

    @worker.handle("linger")
    async def linger(ctx: natrio.TaskContext) -> None:
        await ctx.complete(b"early")
        try:
            await trio.sleep(60)
        finally:
            cancelled.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        assert await (await natrio_client.submit("linger")).result() == b"early"
        assert worker.statistics().dispatcher.in_flight == 1  # still running
        began = trio.current_time()
        worker.stop(0.3)
    assert trio.current_time() - began < 1.3
    assert cancelled.is_set()


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), -1.0])
async def test_non_finite_delays_are_refused(
    delay: float, natrio_client: natrio.Client, natrio_worker_factory: WorkerFactory
) -> None:
    worker = natrio_worker_factory(retry=FAST)

    @worker.handle("later")
    async def later(ctx: natrio.TaskContext) -> None:
        await ctx.fail_retry_after(RuntimeError("x"), delay)

    @worker.handle("nap")
    async def nap(ctx: natrio.TaskContext) -> None:
        await ctx.pause(delay)

    await natrio_worker_factory.start(worker)
    for task_type in ("later", "nap"):
        with trio.fail_after(10), pytest.raises(natrio.TaskFailed) as failed:
            await (await natrio_client.submit(task_type)).result()
        assert failed.value.error.type == "ConfigurationError"
    with pytest.raises(natrio.ConfigurationError):
        natrio.Retryable("x", delay=delay)
    with pytest.raises(natrio.ConfigurationError):
        natrio.RetryPolicy(maximum_interval=delay)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Natrio-Retry", b'{"maximum_interval": Infinity}'),
        (b"Natrio-Retry", b'{"initial_interval": NaN}'),
        (b"Natrio-Deadline", b"nan"),
        (b"Natrio-Deadline", b"inf"),
        (b"Natrio-Iteration", b"0"),
        (b"natrio-reply", b"_INBOX.x"),
    ],
)
async def test_bad_header_values_are_dead_lettered(
    name: bytes,
    value: bytes,
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    await start_echo(natrio_worker_factory)
    await raw_publish(natrio_server, b"natrio.task.echo.default.h.s", b"", {name: value})
    await settled(natrio_connection, "echo")
    assert len(await malformed_reasons(natrio_client)) == 1


async def test_a_fault_of_the_dispatcher_ends_run_deregistered(
    natrio_connection: natrio.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection into natrio's own code (not NATS): the keep-alive loop fails.
    from natrio._dispatch.pool import Dispatcher

    class Bug(Exception):
        pass

    async def broken(self: Dispatcher) -> None:
        await trio.sleep(0.1)
        raise Bug("a bug in the dispatcher")

    monkeypatch.setattr(Dispatcher, "_keep_alive", broken)
    worker = natrio.Worker(natrio_connection, shutdown_grace=30)
    running = trio.Event()

    @worker.handle("stuck")
    async def stuck(ctx: natrio.TaskContext) -> None:
        running.set()
        await trio.sleep(60)

    client = natrio.Client(natrio_connection)
    ended: list[BaseException] = []

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            await worker.run(task_status=task_status)
        except Bug as exc:
            ended.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            await client.submit("stuck")
            await running.wait()
    assert ended, "run() did not end with the dispatcher's fault"
    assert await natrio.list_workers(natrio_connection) == []
    # The task it held went back at once (no 30 s grace, no AckWait).
    other = natrio.Worker(natrio_connection)
    other.handle("stuck", echo)
    async with natrio.open_worker(other):
        with trio.fail_after(5):
            while (await consumer_state(natrio_connection, "stuck"))["ack_pending"]:  # noqa: ASYNC110
                await trio.sleep(0.05)


@pytest.mark.parametrize("separator", [b"\x0b", b"\x0c"])
async def test_subjects_with_whitespace_nats_py_splits_on_are_settled(
    separator: bytes,
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    # nats-server takes a vertical tab or form feed inside a subject; nats-py's parser,
    # unpatched, split the delivered MSG line there and dropped the worker's connection.
    await start_echo(natrio_worker_factory)
    await raw_publish(natrio_server, b"natrio.task.echo.default.a" + separator + b"b.s")
    await settled(natrio_connection, "echo")
    assert natrio_connection.connected
    assert natrio_connection.reconnects == 0
    assert len(await malformed_reasons(natrio_client)) == 1
    await canary(natrio_client)


@pytest.mark.parametrize(
    ("status_line", "headers"),
    [
        (b"NATS/1.0 503", {}),
        (b"NATS/1.0 100 Idle Heartbeat", {}),
        (b"NATS/1.0", {b"Status": b"503"}),
        (b"NATS/1.0 409 Consumer Deleted", {b"Description": b"Consumer Deleted"}),
    ],
)
async def test_a_task_posing_as_a_status_message_is_still_a_task(
    status_line: bytes,
    headers: dict[bytes, bytes],
    natrio_server: natrio.EmbeddedServer,
    natrio_connection: natrio.Connection,
    natrio_client: natrio.Client,
    natrio_worker_factory: WorkerFactory,
) -> None:
    await start_echo(natrio_worker_factory)
    await raw_publish(
        natrio_server, b"natrio.task.echo.default.posing.s", b"x", headers, status_line=status_line
    )
    with trio.fail_after(10):
        assert await natrio_client.handle("echo", "posing", "s").result() == b"x"
    await settled(natrio_connection, "echo")
